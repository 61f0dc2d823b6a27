"""The electric-fish foraging environment: senses against electric_image and closed forms,
bites, dominance-scaled penalties, walls, resets, determinism, and bad input."""

import dataclasses
import math

import pytest
import torch

from fastmodels.efish import field_scale, receptor_ring
from fastmodels.efish.env import (FOOD_CONTRAST, FOOD_RADIUS, SIGNAL_CEIL, SIGNAL_FLOOR, EnvConfig, ForagingEnv,
                                  dipole_signal, log_signal)
from fastmodels.ops import electric_image

# only food and bites pay: no shaping, effort or collision terms, no noise
QUIET = EnvConfig(n_envs=2, n_fish=3, n_food=5, arena_min=30.0, arena_max=30.0, episode_steps=50, shaping=0.0,
                  effort_penalty=0.0, collision_penalty=0.0, noise=0.0, jamming=(0.0, 0.0))


def actions(B, N, speed=0, turn=1, eod=0, bite=0):
    """[B, N, 4] actions; each component a number or a [B, N] tensor."""
    parts = [torch.as_tensor(v, dtype=torch.int64).expand(B, N) for v in (speed, turn, eod, bite)]
    return torch.stack(parts, -1).clone()


def place(env, pos, heading, food, size=None):
    """Put the first environment's fish and food where a test wants them (food not listed: eaten)."""
    env.pos[0] = torch.tensor(pos, dtype=torch.float32)
    env.heading[0] = torch.tensor(heading, dtype=torch.float32)
    env.alive[0] = False
    if food:
        env.food_pos[0, : len(food)] = torch.tensor(food, dtype=torch.float32)
        env.alive[0, : len(food)] = True
    if size is not None:
        env.size[0] = torch.tensor(size, dtype=torch.float32)
    env.potential = env._potential()


def test_log_signal():
    x = torch.tensor([0.0, 1e-9, -SIGNAL_FLOOR, 2 * SIGNAL_FLOOR, 1e-5, -1e-3, SIGNAL_CEIL, -1.0], dtype=torch.float64)
    y = log_signal(x)
    expect = [0.0, 0.0, -0.0, math.log(2) / math.log(1e6), math.log(200) / math.log(1e6), -math.log(2e4) / math.log(1e6), 1.0, -1.0]
    torch.testing.assert_close(y, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dipole_signal_closed_form():
    # a dipole p at the origin: on its axis E = 2 p / r^3, broadside E = -p / r^3 (eps = 0)
    p = torch.tensor([[[3e-3, 0.0]]], dtype=torch.float64)
    centre = torch.zeros(1, 1, 2, dtype=torch.float64)
    rec = torch.tensor([[[[4.0, 0.0], [0.0, 2.5], [-7.0, 0.0]]]], dtype=torch.float64)  # [1, 1, 3, 2]
    nrm = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = dipole_signal(rec, nrm, centre, p, mask, eps=0.0)
    torch.testing.assert_close(got[0, 0], torch.tensor([2 * 3e-3 / 64, -3e-3 / 2.5**3, 0.0], dtype=torch.float64))
    assert (dipole_signal(rec, nrm, centre, p, ~mask, eps=0.0) == 0).all()


def test_observation_layout_and_active_sense_is_electric_image():
    env = ForagingEnv(QUIET, seed=3)
    obs = env.reset()
    c = QUIET
    assert obs.shape == (2, 3, env.obs_dim) and env.obs_dim == 36 + 24 + 12 * 2 + 6 and obs.dtype == torch.float32
    # no EOD at reset: no active or communication signal at all
    Ra, Rp = c.active_receptors, c.passive_receptors
    assert (obs[..., :Ra] == 0).all() and (obs[..., Ra + Rp : Ra + Rp + 24] == 0).all()
    eod = torch.tensor([[1, 0, 1], [0, 1, 0]])
    obs, *_ = env.step(actions(2, 3, eod=eod))
    sensed = env.alive & (env._food_dist().amin(1) < c.sense_range)
    assert sensed.any()
    ra, rn = receptor_ring(c.active_receptors)
    active, _ = electric_image(env.pos, env.heading, eod.float(), env.food_pos, torch.full((2, 5), FOOD_RADIUS),
                               torch.full((2, 5), FOOD_CONTRAST), sensed, ra, rn, arena=env.arena)
    torch.testing.assert_close(obs[..., :Ra], log_signal(active * field_scale()), rtol=1e-6, atol=1e-6)
    assert (obs[..., :Ra] != 0).float().mean() > 0.9
    # proprioception: last EOD, speed, turn, ate, bitten, size
    torch.testing.assert_close(obs[..., -6], eod.float())
    torch.testing.assert_close(obs[..., -1], env.size)


def test_communication_bits_per_other_fish():
    env = ForagingEnv(QUIET, seed=0)
    env.reset()
    place(env, [[5.0, 5.0], [15.0, 5.0], [25.0, 25.0]], [0.0, 1.0, 2.0], [[28.0, 2.0]])  # food left: no reset
    obs, *_ = env.step(actions(2, 3, eod=torch.tensor([[0, 1, 0], [0, 0, 0]])))
    base = QUIET.active_receptors + QUIET.passive_receptors
    heard = obs[0, :, base : base + 24].reshape(3, 2, 12)  # per fish: its two other fish, in index order
    # only fish 1 emitted: fish 0 hears it in slot 1 (others: 1, 2), fish 2 in slot 0 (others: 0, 1)
    assert heard[0, 0].sum() == 12 and heard[0, 1].sum() == 0
    assert heard[2, 0].sum() == 0 and heard[2, 1].sum() == 12
    assert heard[1].sum() == 0  # a fish does not hear itself
    # beyond comm_range the bits go silent
    far = ForagingEnv(dataclasses.replace(QUIET, comm_range=5.0), seed=0)
    far.reset()
    place(far, [[5.0, 5.0], [15.0, 5.0], [25.0, 25.0]], [0.0, 1.0, 2.0], [[28.0, 2.0]])
    obs, *_ = far.step(actions(2, 3, eod=torch.tensor([[0, 1, 0], [0, 0, 0]])))
    assert obs[0, :, base : base + 24].sum() == 0


def test_passive_sense_and_jamming():
    env = ForagingEnv(dataclasses.replace(QUIET, jamming=(0.5, 1.0), food_dipole=2e-3), seed=1)  # sensed from afar
    env.reset()
    place(env, [[5.0, 5.0], [20.0, 5.0], [25.0, 25.0]], [0.3, 1.0, 2.0], [[8.0, 6.0], [21.0, 9.0]])
    Ra, Rp = QUIET.active_receptors, QUIET.passive_receptors

    def expected():
        pp, pn = receptor_ring(Rp)
        cos, sin = env.heading.cos()[..., None], env.heading.sin()[..., None]
        rot = lambda v: torch.stack((cos * v[:, 0] - sin * v[:, 1], sin * v[:, 0] + cos * v[:, 1]), -1)
        sig = dipole_signal((env.pos[:, :, None] + rot(pp)).double(), rot(pn).double(), env.food_pos.double(),
                            env.food_moment.double(), env.alive)
        return log_signal(sig * field_scale())

    obs, *_ = env.step(actions(2, 3))  # nobody emits: the passive sense is noise-free here
    torch.testing.assert_close(obs[0, :, Ra : Ra + Rp].double(), expected()[0], rtol=0, atol=1e-5)
    assert (obs[0, :2, Ra : Ra + Rp] != 0).float().mean() > 0.9  # zero only where the signal changes sign
    a = actions(2, 3)
    a[0, 1, 2] = 1  # fish 1 emits: fish 0 and 2 are jammed (50-100% noise), fish 1 is not
    obs, *_ = env.step(a)
    exp = expected()[0]
    err = (obs[0, :, Ra : Ra + Rp].double() - exp).abs().amax(-1)
    assert err[1] < 1e-5 and err[0] > 1e-3


def test_bites_food_and_contested_items():
    env = ForagingEnv(QUIET, seed=0)
    env.reset()
    # fish 0 faces food 0.8 cm beyond its mouth; fish 1 faces the same item from farther; fish 2 no food
    place(env, [[10.0, 10.0], [10.0 + 1.0 + 0.8 + 1.0 + 0.9, 10.0], [25.0, 25.0]], [0.0, math.pi, 0.0], [[11.8, 10.0], [20.0, 20.0]])
    a = actions(2, 3, bite=1)
    obs, reward, done, info = env.step(a)
    assert info["ate"][0].tolist() == [1.0, 0.0, 0.0]
    assert env.alive[0].tolist() == [False, True, False, False, False]
    torch.testing.assert_close(reward[0], torch.tensor([QUIET.food_reward, 0.0, 0.0]))
    assert obs[0, 0, -3] == 1 and obs[0, 1, -3] == 0  # the "ate" flag
    # without a bite, or out of range, nothing is eaten
    place(env, [[10.0, 10.0], [5.0, 5.0], [25.0, 25.0]], [0.0, 0.0, 0.0], [[11.8, 10.0], [7.0, 5.0 + 0.0]])
    _, reward, _, info = env.step(actions(2, 3, bite=0))
    assert info["ate"][0].sum() == 0 and env.alive[0, :2].all()
    place(env, [[10.0, 10.0], [5.0, 5.0], [25.0, 25.0]], [math.pi, math.pi, 0.0], [[11.8, 10.0], [7.5, 5.0]])
    _, reward, _, info = env.step(actions(2, 3, bite=1))
    assert info["ate"][0].sum() == 0 and env.alive[0, :2].all()


def test_bite_penalty_is_dominance_scaled():
    env = ForagingEnv(QUIET, seed=0)
    env.reset()
    # fish 0 (size 1.2) bites fish 1 (size 0.8) 2.5 cm ahead; fish 2 far away
    place(env, [[10.0, 10.0], [12.5, 10.0], [25.0, 25.0]], [0.0, 0.0, 0.0], [[28.0, 2.0]], size=[1.2, 0.8, 1.0])
    a = actions(2, 3)
    a[0, 0, 3] = 1
    _, reward, _, info = env.step(a)
    torch.testing.assert_close(reward[0], torch.tensor([0.0, -QUIET.bite_penalty * 1.2 / 0.8, 0.0]))
    assert info["bitten"][0].tolist() == [False, True, False]


def test_walls_collisions_and_effort():
    cfg = dataclasses.replace(QUIET, collision_penalty=0.5, effort_penalty=0.1)
    env = ForagingEnv(cfg, seed=0)
    env.reset()
    place(env, [[1.2, 15.0], [15.0, 15.0], [16.5, 15.0]], [math.pi, 0.0, math.pi], [[28.0, 2.0]])
    _, reward, _, info = env.step(actions(2, 3, speed=2))
    br = cfg.body_radius
    assert env.pos[0, 0, 0] == br  # held at the wall
    assert info["collided"][0].tolist() == [False, True, True]
    assert (env.pos[0, 1] - env.pos[0, 2]).norm() >= 2 * br - 1e-5  # pushed apart
    torch.testing.assert_close(reward[0], torch.tensor([-0.1, -0.6, -0.6]))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # random swimming never leaves the tank
        a = torch.stack([torch.randint(0, n, (2, 3), generator=g) for n in (3, 3, 2, 2)], -1)
        env.step(a)
        assert (env.pos >= br - 1e-5).all() and (env.pos <= env.arena[:, None] - br + 1e-5).all()


def test_culled_food_is_not_sensed():
    env = ForagingEnv(QUIET, seed=0)
    env.reset()
    place(env, [[5.0, 5.0], [6.0, 9.0], [9.0, 5.0]], [0.0, 1.0, 2.0], [[8.0, 8.0], [27.0, 27.0]])
    a = actions(2, 3, eod=1)
    obs_with, *_ = env.step(a)
    env2 = ForagingEnv(QUIET, seed=0)
    env2.reset()
    place(env2, [[5.0, 5.0], [6.0, 9.0], [9.0, 5.0]], [0.0, 1.0, 2.0], [[8.0, 8.0]])
    obs_without, *_ = env2.step(a)
    torch.testing.assert_close(obs_with[0], obs_without[0])  # the item 30 cm away changes nothing
    place(env2, [[5.0, 5.0], [6.0, 9.0], [9.0, 5.0]], [0.0, 1.0, 2.0], [])
    obs_empty, *_ = env2.step(a)
    assert not torch.equal(obs_with[0, :, :36], obs_empty[0, :, :36])  # the near item does


def test_shaping_rewards_approach():
    cfg = dataclasses.replace(QUIET, shaping=0.2)
    env = ForagingEnv(cfg, seed=0)
    env.reset()
    place(env, [[5.0, 5.0], [20.0, 20.0], [25.0, 5.0]], [0.0, math.pi, 0.0], [[10.0, 5.0]])
    _, reward, _, _ = env.step(actions(2, 3, speed=2))
    s = cfg.speeds[2]
    # fish 0 swims s cm toward the food; fish 1 and 2 stay beyond sense_range of it (capped)
    torch.testing.assert_close(reward[0], torch.tensor([0.2 * s, 0.0, 0.0]), rtol=0, atol=1e-5)


def test_episodes_reset_and_runs_are_deterministic():
    cfg = dataclasses.replace(QUIET, episode_steps=7, noise=0.05, jamming=(0.5, 1.0))
    runs = []
    for _ in range(2):
        env = ForagingEnv(cfg, seed=11)
        out = [env.reset()]
        g = torch.Generator().manual_seed(5)
        for t in range(10):
            a = torch.stack([torch.randint(0, n, (2, 3), generator=g) for n in (3, 3, 2, 2)], -1)
            obs, reward, done, _ = env.step(a)
            out += [obs, reward]
            assert done.tolist() == [t == 6] * 2
            if t == 6:
                assert (env.t == 0).all() and env.alive.all() and (obs[..., -6:-1] == 0).all()
        runs.append(out)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not torch.equal(ForagingEnv(cfg, seed=12).reset(), runs[0][0])


def test_food_layouts():
    for food in ("patchy", "uniform"):
        env = ForagingEnv(dataclasses.replace(QUIET, n_envs=50, n_food=40, food=food, arena_min=100.0, arena_max=100.0), seed=0)
        env.reset()
        inside = (env.food_pos >= FOOD_RADIUS).all() and (env.food_pos <= 100 - FOOD_RADIUS).all()
        spread = env.food_pos.std(1).mean().item()
        assert inside and env.patchy.all() == (food == "patchy")
        assert spread < 30 if food == "patchy" else spread > 25  # two patches of std 3 cm vs uniform (std 28.9)
    env = ForagingEnv(dataclasses.replace(QUIET, n_envs=400, food="mixed"), seed=0)
    env.reset()
    assert 0.4 < env.patchy.float().mean() < 0.6


def test_bad_input():
    env = ForagingEnv(QUIET, seed=0)
    env.reset()
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 3, 4\]"):
        env.step(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="food"):
        EnvConfig(food="clumped")
    with pytest.raises(ValueError, match="arena_min"):
        EnvConfig(arena_min=50.0, arena_max=40.0)
    with pytest.raises(ValueError, match="n_fish"):
        EnvConfig(n_fish=0)
