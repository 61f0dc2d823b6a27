"""The electric-fish MARL reproduction: recurrent PPO's pieces against plain references, the
IDI statistics against scipy and known distributions, the analyses on hand-made records, and a
quick run."""

import json
import math

import numpy as np
import pytest
import torch

from fastmodels.reproduce import _ppo, efish_marl as ef
from fastmodels.reproduce import reproductions


def test_gae_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    T, A, gamma, lam = 9, 5, 0.97, 0.9
    r, v = torch.randn(T, A, generator=g, dtype=torch.float64), torch.randn(T, A, generator=g, dtype=torch.float64)
    d = torch.rand(T, A, generator=g) < 0.2
    last = torch.randn(A, generator=g, dtype=torch.float64)
    adv, ret = _ppo.gae(r, v, d, last, gamma, lam)
    for a in range(A):
        for t in range(T):
            # the lambda-return written out: sum_k (gamma lam)^k delta_{t+k}, up to the episode's end
            total, w = 0.0, 1.0
            for k in range(t, T):
                nv = (last[a] if k == T - 1 else v[k + 1, a]) * (0.0 if d[k, a] else 1.0)
                total += w * (r[k, a] + gamma * nv - v[k, a])
                if d[k, a]:
                    break
                w *= gamma * lam
            assert abs(adv[t, a] - total) < 1e-12
    torch.testing.assert_close(ret, adv + v)


def test_log_prob_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(7, 4, n, generator=g) for n in (3, 3, 2, 2)]
    acts = torch.stack([torch.randint(0, n, (7, 4), generator=g) for n in (3, 3, 2, 2)], -1)
    logp, ent = _ppo.log_prob_entropy(logits, acts)
    dists = [torch.distributions.Categorical(logits=lg) for lg in logits]
    torch.testing.assert_close(logp, sum(d.log_prob(acts[..., k]) for k, d in enumerate(dists)))
    torch.testing.assert_close(ent, sum(d.entropy() for d in dists))
    # sampling follows the probabilities
    p = torch.tensor([0.7, 0.2, 0.1])
    s = _ppo.sample([p.log().expand(20000, 3)], torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.bincount(s[:, 0], minlength=3).float() / 20000, p, atol=0.015, rtol=0)


def test_sequence_equals_stepping_with_resets():
    torch.manual_seed(0)
    pol = _ppo.GRUPolicy(6, (3, 2), hidden=8)
    T, A = 6, 4
    obs = torch.randn(T, A, 6)
    h0 = torch.randn(A, 8)
    starts = torch.zeros(T, A, dtype=torch.bool)
    starts[0, 1] = starts[3, 2] = True
    logits, values = pol.sequence(obs, h0, starts)
    h = h0
    for t in range(T):
        h = torch.where(starts[t, :, None], torch.zeros_like(h), h)
        lg, v, h = pol.step(obs[t], h)
        torch.testing.assert_close(values[t], v)
        for k in range(2):
            torch.testing.assert_close(logits[k][t], lg[k])
    # a reset forgets the state: agent 1's outputs do not depend on h0
    logits2, values2 = pol.sequence(obs, h0 + 5, starts)
    torch.testing.assert_close(values2[:, 1], values[:, 1])
    assert not torch.allclose(values2[:, 0], values[:, 0])


def test_ppo_update_moves_toward_advantaged_actions():
    torch.manual_seed(0)
    pol = _ppo.GRUPolicy(3, (2,), hidden=8)
    T, A = 5, 16
    obs = torch.randn(T, A, 3)
    h0 = torch.zeros(A, 8)
    starts = torch.zeros(T, A, dtype=torch.bool)
    with torch.no_grad():
        logits, values = pol.sequence(obs, h0, starts)
        acts = _ppo.sample(logits, torch.Generator().manual_seed(0))
        logp, _ = _ppo.log_prob_entropy(logits, acts)
    adv = torch.where(acts[..., 0] == 1, 1.0, -1.0)  # action 1 good, action 0 bad
    batch = {"obs": obs, "actions": acts, "logp": logp, "values": values, "advantages": adv, "returns": values + adv,
             "starts": starts, "h0": h0}
    cfg = _ppo.PPOConfig(epochs=4, minibatches=2, entropy_coef=0.0)
    opt = torch.optim.Adam(pol.parameters(), lr=1e-2)
    stats = _ppo.ppo_update(pol, opt, cfg, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after, _ = pol.sequence(obs, h0, starts)
    p0, p1 = logits[0].softmax(-1)[..., 1].mean(), after[0].softmax(-1)[..., 1].mean()
    assert p1 > p0 + 0.05
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "clip_fraction"}


def test_hurwitz_zeta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for s, q in [(1.05, 1.0), (1.5, 1.0), (2.0, 3.0), (2.7, 10.0), (4.0, 1.0), (7.5, 2.0)]:
        assert ef.hurwitz_zeta(s, q) == pytest.approx(float(special.zeta(s, q)), rel=1e-10)


def discrete_power_law(alpha, xmin, n, seed, xmax=200_000):
    x = np.arange(xmin, xmax + 1, dtype=np.float64)
    p = x**-alpha
    return np.random.default_rng(seed).choice(x.astype(np.int64), size=n, p=p / p.sum())


def test_power_law_fit_recovers_alpha_and_beats_geometric():
    for alpha in (1.8, 2.5):
        x = discrete_power_law(alpha, 1, 20_000, seed=int(alpha * 10))
        fit = ef.fit_discrete_power_law(x, xmin=1)
        assert abs(fit["alpha"] - alpha) < 0.03 and fit["llr"] > 0 and fit["p_value"] < 1e-6
    # xmin found by the KS scan: below 4 the samples are uniform, from 4 on a power law
    rng = np.random.default_rng(3)
    x = np.concatenate([discrete_power_law(2.2, 4, 20_000, seed=4), rng.integers(1, 4, 4000)])
    fit = ef.fit_discrete_power_law(x)
    assert fit["xmin"] == 4 and abs(fit["alpha"] - 2.2) < 0.05
    # memoryless emission (geometric intervals) is not heavy-tailed: the test favours the geometric
    geo = np.random.default_rng(5).geometric(0.3, 20_000)
    fit = ef.fit_discrete_power_law(geo, xmin=1)
    assert fit["llr"] < 0 and fit["p_value"] < 1e-6
    with pytest.raises(ValueError, match="samples"):
        ef.fit_discrete_power_law([0, 1, 2])
    with pytest.raises(ValueError, match="samples"):
        ef.fit_discrete_power_law([3, 3, 3], xmin=1)


def test_inter_discharge_intervals():
    eod = torch.zeros(10, 1, 2)
    eod[[0, 3, 4, 9], 0, 0] = 1
    eod[[2, 7], 0, 1] = 1
    assert sorted(ef.inter_discharge_intervals(eod).tolist()) == [1, 3, 5, 5]
    assert len(ef.inter_discharge_intervals(torch.zeros(5, 2, 3))) == 0


def test_analyse_freeloading_measures():
    # two fish: fish 1 emits exactly when fish 0 did not emit the step before; fish 0 every 3rd step
    T = 300
    e = torch.zeros(T, 1, 2)
    e[::3, 0, 0] = 1
    e[1:, 0, 1] = 1 - e[:-1, 0, 0]
    food = torch.tensor([[2.0, 1.0]])
    out = ef.analyse({"eod": e, "food": food, "size": torch.tensor([[1.1, 0.9]])})
    assert out["food_per_fish"] == 1.5 and out["episode_steps"] == T
    assert out["food_per_fish_per_100_steps"] == pytest.approx(100 * 3 / (2 * T))
    assert out["food_vs_relative_size_r"] == pytest.approx(1.0) and out["food_share_of_largest"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["eod_rate"] == pytest.approx(e.mean().item(), abs=1e-4)
    # P(emit | a neighbour emitted at t - 1): over both fish; fish 1 never emits after fish 0's EOD
    prev_other = torch.stack([e[:-1, 0, 1], e[:-1, 0, 0]], -1) > 0
    cur = e[1:, 0]
    assert out["eod_prob_after_neighbour_eod"] == pytest.approx((cur[prev_other].mean()).item(), abs=1e-4)
    assert out["eod_prob_after_quiet"] == pytest.approx((cur[~prev_other].mean()).item(), abs=1e-4)
    assert out["idi"]["count"] == 99 + 199 - 1 and out["idi"]["max"] == 3
    # an episode that ended early (NaN after its end) counts only its live steps
    e2 = e.clone()
    e2[150:] = float("nan")
    out2 = ef.analyse({"eod": e2, "food": food, "size": torch.tensor([[0.9, 1.1]])})
    assert out2["food_vs_relative_size_r"] == pytest.approx(-1.0) and out2["food_share_of_largest"] == pytest.approx(1 / 3, abs=1e-4)
    assert out2["eod_rate"] == pytest.approx(e[:150].mean().item(), abs=1e-4)
    assert out2["episode_steps"] == 150 and out2["food_per_fish_per_100_steps"] == pytest.approx(100 * 3 / (2 * 150))
    # a constant has no correlation: None, not NaN, in the summary
    assert ef.analyse({"eod": torch.zeros(60, 1, 2), "food": food, "size": torch.ones(1, 2)})["eod_rate_vs_neighbours_r"] is None


def test_rollout_controls():
    cfg = ef.QUICK
    env = ef.ForagingEnv(ef.env_config(cfg))
    policy = _ppo.GRUPolicy(env.obs_dim, ef.ACTION_SIZES, cfg.hidden)
    seen = []
    step = policy.step
    policy.step = lambda obs, h: seen.append(obs.clone()) or step(obs, h)
    c = env.cfg
    comm = slice(c.active_receptors + c.passive_receptors, c.active_receptors + c.passive_receptors + c.comm_receptors * (cfg.n_fish - 1))
    for comm_off in (False, True):
        seen.clear()
        ep = ef.rollout_episodes(cfg, policy, "patchy", torch.device("cpu"), seed=0, comm_off=comm_off)
        heard = torch.stack(seen)[..., comm]
        assert (heard == 0).all() if comm_off else heard.sum() > 0
        assert (torch.stack(seen)[..., : c.active_receptors] != 0).float().mean() > 0.5  # the active sense is untouched
        assert ep["size"].shape == (cfg.eval_envs, cfg.n_fish)
    off = ef.rollout_episodes(cfg, policy, "patchy", torch.device("cpu"), seed=0, eod_off=True)
    assert off["eod"].shape == (cfg.episode_steps, cfg.eval_envs, cfg.n_fish) and (off["eod"].nan_to_num(0) == 0).all()
    rnd = ef.rollout_episodes(cfg, None, "uniform", torch.device("cpu"), seed=0)
    rate = rnd["eod"].nanmean().item()
    assert 0.4 < rate < 0.6 and (rnd["food"] >= 0).all()


def test_quick_run(tmp_path):
    rep = reproductions()["efish-marl"]
    out = rep.run(True, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert out["headline"] == summary["headline"]
    assert summary["training"]["env_steps"] == ef.QUICK.updates * ef.QUICK.rollout * ef.QUICK.n_envs
    assert len(summary["training"]["history"]) == ef.QUICK.updates
    for food in ("patchy", "uniform"):
        ev = summary["evaluation"][food]
        assert set(ev) == {"trained", "eod_off", "comm_off", "random"} and ev["eod_off"]["eod_rate"] == 0
    assert summary["env_speed"]["env_steps_per_s_fused"] > 0 and (tmp_path / "policy.pt").exists()
    assert math.isfinite(summary["headline"]["env_speedup_vs_reference"])
