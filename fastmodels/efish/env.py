"""A batched multi-agent electric-fish foraging environment (arXiv:2511.08436, spec efield.md
section 2), all environments stepped at once in PyTorch with the fused
:func:`fastmodels.ops.electric_image` as the active and communication senses.

Every environment is a rectangular tank with insulating walls, ``n_fish`` fish and ``n_food``
food items (insulating spheres, radius 0.25 cm, contrast -0.5) laid out in patches or uniformly,
without regrowth. Each step (12 ms in the paper) every fish chooses four discrete actions: a
forward speed, a turn, whether to emit an EOD, and whether to bite. Observations are egocentric
only (no positions):

* active sense: ``active_receptors`` receptors on a ring of radius 1 cm; the EOD field of this
  step at each, minus the fish's own direct field (what ``electric_image`` computes), so a fish
  that stays silent still senses objects lit by its neighbours' EODs;
* passive sense: ``passive_receptors`` receptors sensing every food item's weak intrinsic DC
  dipole; its noise rises to 50-100% of the signal while any other fish emits (jamming);
* communication: ``comm_receptors`` receptors per other fish, binarized: 1 where that fish's EOD
  field (``electric_image``'s per-emitter output) exceeds the field of its dipole broadside at
  ``comm_range`` cm;
* proprioception: the fish's own last EOD, speed and turn, whether it ate or was bitten, its size.

Active and passive signals (V/m) are clipped to [5e-8, 5e-2] in magnitude, log-scaled to [0, 1]
keeping their sign (0 below the floor) and carry 5% multiplicative noise. Food beyond
``sense_range`` cm of every fish is culled from the field computation.

Rewards are individual: ``food_reward`` per item eaten (a bite eats the nearest item within
``bite_range`` of the mouth; the closer fish wins a contested item), potential-based shaping of
the distance to the nearest food within ``sense_range``, a penalty for being bitten scaled by the
biter's size over the victim's (dominance), and small collision and effort penalties. EODs cost
nothing. An environment resets itself after ``episode_steps`` steps or when its food is gone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastmodels.efish.receptors import receptor_ring
from fastmodels.efish.units import field_scale
from fastmodels.ops import electric_image

SIGNAL_FLOOR, SIGNAL_CEIL = 5e-8, 5e-2  # V/m
FOOD_RADIUS, FOOD_CONTRAST = 0.25, -0.5


@dataclass(frozen=True)
class EnvConfig:
    n_envs: int = 64
    n_fish: int = 4
    n_food: int = 32
    arena_min: float = 40.0  # tank side, sampled per episode in [arena_min, arena_max] (cm)
    arena_max: float = 300.0
    food: str = "patchy"  # "patchy", "uniform", or "mixed" (each episode one of the two)
    n_patches: int = 2
    patch_std: float = 3.0  # cm
    episode_steps: int = 1600
    speeds: tuple = (0.0, 0.15, 0.3)  # cm per step
    turn: float = 0.15  # radians per step of a left or right turn
    body_radius: float = 1.0  # cm
    bite_range: float = 1.0  # mouth (body_radius ahead of the centre) to food centre, cm
    sense_range: float = 15.0  # food farther from every fish is culled, cm
    comm_range: float = 100.0  # cm
    active_receptors: int = 36
    passive_receptors: int = 24
    comm_receptors: int = 12
    food_dipole: float = 5e-6  # a food item's weak intrinsic dipole (normalized units): above the floor within ~2 cm
    food_reward: float = 10.0
    shaping: float = 0.2  # reward per cm closer to the nearest sensed food
    bite_penalty: float = 1.0  # times biter size / victim size
    collision_penalty: float = 0.05
    effort_penalty: float = 0.01  # per step at full speed, and per turn
    noise: float = 0.05
    jamming: tuple = (0.5, 1.0)
    size_range: tuple = (0.8, 1.2)  # relative body size (dominance)
    backend: str | None = None  # electric_image backend (None: the fused default)

    def __post_init__(self):
        if self.n_fish < 1 or self.n_envs < 1 or self.n_food < 1:
            raise ValueError(f"n_envs, n_fish, n_food: expected >= 1, got {self.n_envs}, {self.n_fish}, {self.n_food}")
        if self.food not in ("patchy", "uniform", "mixed"):
            raise ValueError(f"food: expected 'patchy', 'uniform' or 'mixed', got {self.food!r}")
        if not 2 * self.body_radius < self.arena_min <= self.arena_max:
            raise ValueError(f"arena_min, arena_max: expected 2 * body_radius < arena_min <= arena_max, "
                             f"got {self.arena_min}, {self.arena_max}")


N_MOVES = 3  # index into speeds
N_TURNS = 3  # left, straight, right
ACTION_SIZES = (N_MOVES, N_TURNS, 2, 2)  # speed, turn, EOD, bite


def log_signal(x: torch.Tensor) -> torch.Tensor:
    """Signed log scale of a field in V/m: 0 below 5e-8, 1 at and above 5e-2 in magnitude."""
    mag = x.abs().clamp(SIGNAL_FLOOR, SIGNAL_CEIL)
    return x.sign() * torch.log(mag / SIGNAL_FLOOR) / math.log(SIGNAL_CEIL / SIGNAL_FLOOR)


def dipole_signal(rec: torch.Tensor, nrm: torch.Tensor, centre: torch.Tensor, moment: torch.Tensor,
                  mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """n . sum_m E_m at receptors ``rec`` [B, N, R, 2] with normals ``nrm``, E_m the field of a
    point dipole ``moment`` [B, M, 2] at ``centre`` [B, M, 2] (masked by ``mask`` [B, M]):
    (3 (p . d) d / |d|^2 - p) / rho^3, rho = |d| + eps. Returns [B, N, R]."""
    d = rec[:, :, :, None, :] - centre[:, None, None]  # [B, N, R, M, 2]
    r2 = (d * d).sum(-1)
    rho = r2.sqrt() + eps
    p = moment[:, None, None]
    pd = (p * d).sum(-1, keepdim=True)
    e = (3 * pd * d / r2.clamp_min(eps * eps)[..., None] - p) / rho[..., None] ** 3
    e = e * mask[:, None, None, :, None]
    return (nrm[:, :, :, None] * e).sum((-1, -2))


class ForagingEnv:
    """``n_envs`` tanks stepped together; see the module docstring. ``reset()`` and ``step(actions)``
    return observations [n_envs, n_fish, obs_dim] (float32); ``step`` also rewards
    [n_envs, n_fish], per-environment ``done`` [n_envs] and an info dict of the step's events."""

    def __init__(self, cfg: EnvConfig, *, seed: int = 0, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        c = cfg
        ra, rn = receptor_ring(c.active_receptors, device=self.device)
        ca, cn = receptor_ring(c.comm_receptors, device=self.device)
        self.rec_pos, self.rec_nrm = torch.cat([ra, ca]), torch.cat([rn, cn])  # one electric_image call for both
        self.passive_pos, self.passive_nrm = receptor_ring(c.passive_receptors, device=self.device)
        self.scale = field_scale()
        # |comm| above a dipole's broadside field at comm_range (moment = pole separation 1 cm)
        self.comm_threshold = 1.0 / c.comm_range**3
        self.speeds = torch.tensor(c.speeds, device=self.device)
        self.obs_dim = c.active_receptors + c.passive_receptors + c.comm_receptors * (c.n_fish - 1) + 6
        B, N, M = c.n_envs, c.n_fish, c.n_food
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=self.device)  # noqa: E731
        self.pos, self.heading, self.size = z(B, N, 2), z(B, N), z(B, N)
        self.food_pos, self.food_moment, self.alive = z(B, M, 2), z(B, M, 2), z(B, M, dtype=torch.bool)
        self.arena, self.patchy = z(B, 2), z(B, dtype=torch.bool)
        self.t = z(B, dtype=torch.int64)
        self.last = z(B, N, 5)  # eod, speed / max, turn, ate, bitten
        self.potential = z(B, N)

    # -- state ---------------------------------------------------------------------------------

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def _reset_envs(self, idx: torch.Tensor):
        c, n = self.cfg, len(idx)
        if n == 0:
            return
        N, M, br = c.n_fish, c.n_food, c.body_radius
        side = c.arena_min + (c.arena_max - c.arena_min) * self._rand(n, 1)
        arena = side.expand(n, 2)
        self.arena[idx] = arena
        self.pos[idx] = br + (arena[:, None] - 2 * br) * self._rand(n, N, 2)
        self.heading[idx] = 2 * math.pi * self._rand(n, N)
        self.size[idx] = c.size_range[0] + (c.size_range[1] - c.size_range[0]) * self._rand(n, N)
        patchy = torch.full((n,), c.food == "patchy", device=self.device) if c.food != "mixed" else self._rand(n) < 0.5
        self.patchy[idx] = patchy
        margin = FOOD_RADIUS + 0.5
        uniform = margin + (arena[:, None] - 2 * margin) * self._rand(n, M, 2)
        centres = margin + c.patch_std + (arena[:, None] - 2 * (margin + c.patch_std)).clamp_min(0) * self._rand(n, c.n_patches, 2)
        which = (self._rand(n, M) * c.n_patches).long().clamp_max(c.n_patches - 1)
        noise = torch.randn(n, M, 2, generator=self.gen, device=self.device) * c.patch_std
        patch = (centres.gather(1, which[..., None].expand(n, M, 2)) + noise).clamp_min(margin)
        patch = torch.minimum(patch, arena[:, None] - margin)
        self.food_pos[idx] = torch.where(patchy[:, None, None], patch, uniform)
        angle = 2 * math.pi * self._rand(n, M)
        self.food_moment[idx] = c.food_dipole * torch.stack((angle.cos(), angle.sin()), -1)
        self.alive[idx] = True
        self.t[idx] = 0
        self.last[idx] = 0
        self.potential[idx] = self._potential()[idx]

    def _food_dist(self) -> torch.Tensor:
        """[B, N, M] centre-to-food distances, inf for eaten food."""
        d = (self.pos[:, :, None] - self.food_pos[:, None]).norm(dim=-1)
        return d.masked_fill(~self.alive[:, None], math.inf)

    def _potential(self) -> torch.Tensor:
        """Shaping potential: -(distance to the nearest food, capped at sense_range)."""
        return -self._food_dist().amin(-1).clamp_max(self.cfg.sense_range) * self.cfg.shaping

    # -- observation ---------------------------------------------------------------------------

    def _observe(self, eod: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, N = c.n_envs, c.n_fish
        sensed = self.alive & (self._food_dist().amin(1) < c.sense_range)  # culling
        M = c.n_food
        active, comm = electric_image(
            self.pos, self.heading, eod, self.food_pos, torch.full((B, M), FOOD_RADIUS, device=self.device),
            torch.full((B, M), FOOD_CONTRAST, device=self.device), sensed, self.rec_pos, self.rec_nrm,
            arena=self.arena, backend=c.backend, check_values=False)
        Ra = c.active_receptors
        noisy = lambda x, level: x * (1 + level * torch.randn(x.shape, generator=self.gen, device=self.device))  # noqa: E731
        act = log_signal(noisy(active[..., :Ra] * self.scale, c.noise))
        # passive sense of the food's intrinsic dipoles, jammed while any other fish emits
        cos, sin = self.heading.cos()[..., None], self.heading.sin()[..., None]
        rot = lambda v: torch.stack((cos * v[:, 0] - sin * v[:, 1], sin * v[:, 0] + cos * v[:, 1]), -1)  # noqa: E731
        passive = dipole_signal(self.pos[:, :, None] + rot(self.passive_pos), rot(self.passive_nrm), self.food_pos,
                                self.food_moment, sensed)
        others_emit = (eod.sum(1, keepdim=True) - eod) > 0  # [B, N]
        jam = c.jamming[0] + (c.jamming[1] - c.jamming[0]) * self._rand(B, N)
        level = torch.where(others_emit, jam, torch.full_like(jam, c.noise))[..., None]
        pas = log_signal(noisy(passive * self.scale, level))
        # communication: per other fish (in index order, skipping the fish itself), binarized
        heard = (comm[..., Ra:].abs() > self.comm_threshold).float()  # [B, N, N, Rc]
        others = ~torch.eye(N, dtype=torch.bool, device=self.device)
        heard = heard[:, others].reshape(B, N, (N - 1) * c.comm_receptors)
        return torch.cat([act, pas, heard, self.last, self.size[..., None]], -1)

    def reset(self) -> torch.Tensor:
        self._reset_envs(torch.arange(self.cfg.n_envs, device=self.device))
        return self._observe(torch.zeros_like(self.heading))

    # -- dynamics ------------------------------------------------------------------------------

    def step(self, actions: torch.Tensor):
        """``actions`` [n_envs, n_fish, 4] int64: speed index, turn (0 left, 1 straight, 2
        right), EOD (0/1), bite (0/1)."""
        c = self.cfg
        B, N = c.n_envs, c.n_fish
        if actions.shape != (B, N, 4):
            raise ValueError(f"actions: expected shape [{B}, {N}, 4], got {list(actions.shape)}")
        speed = self.speeds[actions[..., 0]]
        turn = (actions[..., 1] - 1).float()
        eod = actions[..., 2].float()
        bite = actions[..., 3].bool()
        br = c.body_radius
        self.heading = torch.remainder(self.heading + c.turn * turn, 2 * math.pi)
        u = torch.stack((self.heading.cos(), self.heading.sin()), -1)
        self.pos = torch.minimum(torch.maximum(self.pos + speed[..., None] * u, torch.full_like(self.pos, br)),
                                 self.arena[:, None] - br)
        # fish-fish collisions: penalty, and both pushed apart to touching
        diff = self.pos[:, :, None] - self.pos[:, None]  # [B, N, N, 2]
        dist = diff.norm(dim=-1) + torch.eye(N, device=self.device) * 1e9
        overlap = (2 * br - dist).clamp_min(0)
        collided = (overlap > 0).any(-1)
        push = (0.5 * overlap / dist.clamp_min(1e-6))[..., None] * diff
        self.pos = torch.minimum(torch.maximum(self.pos + push.sum(2), torch.full_like(self.pos, br)), self.arena[:, None] - br)

        # bites: each biting fish eats its nearest food within bite_range of its mouth; the
        # closer fish wins a contested item
        mouth = self.pos + br * u
        dm = (mouth[:, :, None] - self.food_pos[:, None]).norm(dim=-1).masked_fill(~self.alive[:, None], math.inf)
        near, choice = dm.amin(-1), dm.argmin(-1)  # [B, N]
        claims = bite & (near < c.bite_range)
        claimed = torch.nn.functional.one_hot(choice, c.n_food).bool() & claims[..., None]  # [B, N, M]
        winner = dm.masked_fill(~claimed, math.inf).argmin(1)  # [B, M]
        eaten_item = claimed.any(1)
        ate = (torch.nn.functional.one_hot(winner, N).bool() & eaten_item[..., None]).sum(1).float()  # [B, N]
        self.alive &= ~eaten_item
        # biting other fish: the victim pays bite_penalty * biter size / victim size
        dmf = (mouth[:, :, None] - self.pos[:, None]).norm(dim=-1) + torch.eye(N, device=self.device) * 1e9
        hits = bite[..., None] & (dmf < br + c.bite_range)  # [B, biter, victim]
        bitten = (hits.float() * self.size[:, :, None]).sum(1) / self.size  # sum of biter sizes / own size

        potential = self._potential()
        reward = (c.food_reward * ate + (potential - self.potential) - c.bite_penalty * bitten
                  - c.collision_penalty * collided.float()
                  - c.effort_penalty * (speed / self.speeds[-1].clamp_min(1e-9) + turn.abs()))
        self.potential = potential
        self.last = torch.stack((eod, speed / self.speeds[-1].clamp_min(1e-9), turn, ate, (bitten > 0).float()), -1)
        self.t += 1
        info = {"ate": ate, "bitten": bitten > 0, "collided": collided, "eod": eod,
                "food_left": self.alive.sum(1), "patchy": self.patchy.clone()}
        obs = self._observe(eod)  # the EOD images of this step, at the new positions
        done = (self.t >= c.episode_steps) | ~self.alive.any(1)
        if done.any():
            idx = done.nonzero().squeeze(1)
            self._reset_envs(idx)
            obs[idx] = self._observe(torch.zeros_like(eod))[idx]
        return obs, reward, done, info
