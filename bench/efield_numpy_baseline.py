"""A straightforward NumPy float64 electric image, structured the way the paper's environment
(KempnerInstitute/wef, onpolicy/custom/fish/) computes it: one environment at a time; the scene's
sources built as arrays (fish poles, induced dipoles from the poles' field at the objects, a copy of
every source mirrored across each of the four walls); then a Python loop over the fish, each one
measuring the field of the sources it senses at its receptors (vectorized over receptors x
sources) and, per other fish, that fish's communication field. Written for this benchmark (same
definitions as fastmodels.ops.electric_image), not copied from the authors' code.
"""

from __future__ import annotations

import numpy as np


def _field(points, mono_pos=None, mono_q=None, dip_pos=None, dip_p=None, eps=1e-3):
    """Field [P, 2] at ``points`` [P, 2] of monopoles and dipoles (normalized units)."""
    out = np.zeros_like(points)
    if mono_pos is not None and len(mono_pos):
        d = points[:, None, :] - mono_pos[None]
        rho = np.linalg.norm(d, axis=-1) + eps
        out += np.sum(mono_q[None, :, None] * d / rho[..., None] ** 3, axis=1)
    if dip_pos is not None and len(dip_pos):
        d = points[:, None, :] - dip_pos[None]
        r = np.linalg.norm(d, axis=-1)
        rho = r + eps
        pd = np.sum(dip_p[None] * d, axis=-1)
        out += np.sum((3 * pd[..., None] * d / np.maximum(r, 1e-300)[..., None] ** 2 - dip_p[None]) / rho[..., None] ** 3, axis=1)
    return out


def _reflect(pos, vec, W, H):
    """The four wall images of points ``pos`` [K, 2] with vectors ``vec`` [K, 2] (dipole moments)
    or charges [K] (vec.ndim == 1), one wall at a time."""
    imgs_pos, imgs_vec = [], []
    for wall in ("left", "right", "bottom", "top"):
        p = pos.copy()
        v = vec.copy()
        if wall == "left":
            p[:, 0] = -p[:, 0]
        elif wall == "right":
            p[:, 0] = 2 * W - p[:, 0]
        elif wall == "bottom":
            p[:, 1] = -p[:, 1]
        else:
            p[:, 1] = 2 * H - p[:, 1]
        if vec.ndim == 2:
            v[:, 0 if wall in ("left", "right") else 1] *= -1
        imgs_pos.append(p)
        imgs_vec.append(v)
    return np.concatenate(imgs_pos), np.concatenate(imgs_vec)


def electric_image_numpy(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                         receptor_normal, arena=None, pole_separation=1.0, eps=1e-3, image_strength=1.0):
    """NumPy float64 arrays in, ``(active [B, N, R], comm [B, N, N, R])`` out."""
    B, N, _ = fish_pos.shape
    R = receptor_pos.shape[0]
    active = np.zeros((B, N, R))
    comm = np.zeros((B, N, N, R))
    for b in range(B):
        u = np.stack((np.cos(fish_heading[b]), np.sin(fish_heading[b])), -1)
        poles = np.concatenate((fish_pos[b] + 0.5 * pole_separation * u, fish_pos[b] - 0.5 * pole_separation * u))
        charges = np.concatenate((eod[b], -eod[b]))
        owner = np.concatenate((np.arange(N), np.arange(N)))
        valid = obj_mask[b]
        centres = obj_pos[b][valid]
        moments = (obj_contrast[b][valid] * obj_radius[b][valid] ** 3)[:, None] * _field(centres, poles, charges, eps=eps)
        if arena is not None:
            W, H = arena[b]
            img_poles, img_q = _reflect(poles, charges, W, H)
            img_c, img_p = _reflect(centres, moments, W, H)
            img_q, img_p = image_strength * img_q, image_strength * img_p
        for i in range(N):
            c, s = np.cos(fish_heading[b, i]), np.sin(fish_heading[b, i])
            rot = np.array([[c, -s], [s, c]])
            sensors = fish_pos[b, i] + receptor_pos @ rot.T
            normals = receptor_normal @ rot.T
            others = owner != i
            field = _field(sensors, poles[others], charges[others], centres, moments, eps=eps)
            if arena is not None:
                field += _field(sensors, img_poles, img_q, img_c, img_p, eps=eps)
            active[b, i] = np.sum(field * normals, -1)
            for j in range(N):
                if j != i:
                    mine = owner == j
                    comm[b, i, j] = np.sum(_field(sensors, poles[mine], charges[mine], eps=eps) * normals, -1)
    return active, comm
