"""Electric-fish multi-agent RL (Singh et al., arXiv:2511.08436): fish that sense their tank only
through electric fields (their own EODs' echoes, their neighbours' EODs, food's weak DC fields)
learn, with one shared GRU policy trained by PPO on individual rewards, to forage and to time
their EODs. The environment is :class:`fastmodels.efish.env.ForagingEnv`, whose active and
communication senses are the fused ``electric_image``.

    python -m fastmodels.reproduce.efish_marl --out runs/efish [--preset quick|cpu|paper] [--updates 400 ...]

``PAPER`` is the paper's scale (tanks of 40-300 cm, 1600-step episodes, GRU 512, about 5M
environment steps: a GPU job); ``CPU`` smaller tanks, 256-step episodes and a GRU of 128 for
about 35 minutes of the 2-core development CPU; ``QUICK`` checks the pipeline.

Measured, on fresh evaluation tanks (patchy and uniform food), for the trained policy, the same
policy with its EOD forced off or its communication receptors silenced, and a uniformly random
policy: food eaten per fish per episode;
the EOD rate by food layout; the inter-discharge intervals (IDIs) with a discrete power-law fit
(Clauset, Shalizi and Newman 2009) against a geometric one (what memoryless emission gives);
freeloading (a fish's EOD rate against its neighbours', and its EOD probability after a
neighbour's EOD); dominance (food against body size within a tank) and the policy with its
communication receptors silenced (the paper's two-fish assay asks both; ``--n-fish 2`` runs the
same measures on two fish); and the environment's speed with the fused ``electric_image`` against the
PyTorch reference backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmodels.efish.env import ACTION_SIZES, EnvConfig, ForagingEnv
from fastmodels.reproduce import register
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment
from fastmodels.reproduce._ppo import GRUPolicy, PPOConfig, gae, log_prob_entropy, ppo_update, sample


@dataclass(frozen=True)
class EfishConfig:
    n_envs: int = 64
    n_fish: int = 4
    n_food: int = 32
    arena_min: float = 40.0
    arena_max: float = 300.0
    episode_steps: int = 1600
    food: str = "mixed"  # training layout: each episode patchy or uniform
    hidden: int = 512
    updates: int = 600  # PPO updates of rollout * n_envs environment steps
    rollout: int = 128
    epochs: int = 4
    minibatches: int = 4
    lr: float = 3e-4
    entropy_coef: float = 0.01
    eval_envs: int = 64  # evaluation tanks per food layout (one full episode each)
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"


PAPER = EfishConfig()
CPU = dataclasses.replace(PAPER, n_envs=32, n_food=16, arena_min=20.0, arena_max=40.0, episode_steps=256, hidden=128,
                          updates=1000, lr=1e-3, eval_envs=32)
QUICK = dataclasses.replace(CPU, n_envs=8, n_food=8, episode_steps=64, hidden=32, updates=4, rollout=32, epochs=2,
                            minibatches=2, eval_envs=8)
PRESETS = {"quick": QUICK, "cpu": CPU, "paper": PAPER}


def env_config(cfg: EfishConfig, *, food: str | None = None, n_envs: int | None = None, backend=None) -> EnvConfig:
    return EnvConfig(n_envs=n_envs or cfg.n_envs, n_fish=cfg.n_fish, n_food=cfg.n_food, arena_min=cfg.arena_min,
                     arena_max=cfg.arena_max, food=food or cfg.food, episode_steps=cfg.episode_steps, backend=backend)


# -- statistics ------------------------------------------------------------------------------------

def hurwitz_zeta(s: float, q: float, terms: int = 64) -> float:
    """sum_{k >= 0} (q + k)^-s for s > 1, q > 0 (direct sum plus an Euler-Maclaurin tail)."""
    k = np.arange(terms, dtype=np.float64)
    head = np.sum((q + k) ** -s)
    x = q + terms
    return float(head + x ** (1 - s) / (s - 1) + 0.5 * x**-s + s / 12 * x ** (-s - 1) - s * (s + 1) * (s + 2) / 720 * x ** (-s - 3))


def _power_law_alpha(x: np.ndarray, xmin: int) -> float:
    """MLE of the exponent of a discrete power law p(x) = x^-a / zeta(a, xmin), x >= xmin."""
    n, sum_log = len(x), float(np.log(x).sum())
    nll = lambda a: n * math.log(hurwitz_zeta(a, xmin)) + a * sum_log  # noqa: E731
    lo, hi = 1.0001, 20.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):  # golden-section search (the likelihood is log-concave in a)
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return (lo + hi) / 2


def _power_law_cdf(alpha: float, xmin: int, xs: np.ndarray) -> np.ndarray:
    """P(X <= x) for the discrete power law at the integers ``xs`` >= xmin."""
    z = hurwitz_zeta(alpha, xmin)
    return np.array([1 - hurwitz_zeta(alpha, x + 1) / z for x in xs])


def fit_discrete_power_law(samples, xmin: int | None = None, max_xmin: int = 20) -> dict:
    """Discrete power-law fit of positive integer ``samples`` (Clauset et al. 2009): the exponent by
    maximum likelihood, ``xmin`` (when not given) minimizing the Kolmogorov-Smirnov distance over
    1..max_xmin; and Vuong's likelihood-ratio test against a geometric (memoryless) tail on the same
    x >= xmin: ``llr`` > 0 favours the power law, ``p_value`` its two-sided significance."""
    x = np.asarray(samples, dtype=np.int64)
    if x.ndim != 1 or len(x) == 0 or (x < 1).any():
        raise ValueError("samples: expected a non-empty 1-D array of integers >= 1")
    candidates = [xmin] if xmin is not None else [m for m in range(1, max_xmin + 1) if (x >= m).sum() >= 50] or [1]
    best = None
    for m in candidates:
        tail = x[x >= m].astype(np.float64)
        if len(tail) < 2 or tail.max() == tail.min():
            continue
        alpha = _power_law_alpha(tail, m)
        xs = np.arange(m, int(tail.max()) + 1)
        empirical = np.searchsorted(np.sort(tail), xs, side="right") / len(tail)
        ks = float(np.abs(empirical - _power_law_cdf(alpha, m, xs)).max())
        if best is None or ks < best["ks"]:
            best = {"alpha": alpha, "xmin": m, "ks": ks, "n_tail": int(len(tail))}
    if best is None:
        raise ValueError("samples: expected at least two distinct values at or above xmin")
    m, alpha = best["xmin"], best["alpha"]
    tail = x[x >= m].astype(np.float64)
    log_pl = -alpha * np.log(tail) - math.log(hurwitz_zeta(alpha, m))
    p = 1.0 / (tail.mean() - m + 1)  # geometric MLE on x - xmin
    log_geo = np.log(p) + (tail - m) * np.log1p(-p) if p < 1 else np.where(tail == m, 0.0, -np.inf)
    diff = log_pl - log_geo
    llr = float(diff.sum())
    sd = float(diff.std())
    z = llr / (sd * math.sqrt(len(diff))) if sd > 0 else math.copysign(math.inf, llr)
    best.update(llr=llr, p_value=float(math.erfc(abs(z) / math.sqrt(2))), alpha=round(alpha, 4), ks=round(best["ks"], 4))
    return best


def inter_discharge_intervals(eod: torch.Tensor) -> np.ndarray:
    """Steps between consecutive EODs of every fish: ``eod`` [T, ...] 0/1 -> 1-D integer array."""
    e = eod.reshape(eod.shape[0], -1).T.bool().cpu()
    out = [torch.diff(row.nonzero().squeeze(1)) for row in e]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def _round(x, digits):
    return None if x is None else round(x, digits)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return a.dot(b).item() / den if den > 0 else None  # undefined for a constant (None in the JSON)


# -- training and evaluation ----------------------------------------------------------------------

def train(cfg: EfishConfig, device: torch.device, log=print) -> tuple[GRUPolicy, dict]:
    env = ForagingEnv(env_config(cfg), seed=cfg.seed, device=device)
    torch.manual_seed(cfg.seed)
    policy = GRUPolicy(env.obs_dim, ACTION_SIZES, cfg.hidden).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    ppo = PPOConfig(rollout=cfg.rollout, epochs=cfg.epochs, minibatches=cfg.minibatches, lr=cfg.lr, entropy_coef=cfg.entropy_coef)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # action sampling and minibatches
    A = cfg.n_envs * cfg.n_fish
    obs = env.reset().reshape(A, -1)
    h = policy.initial_state(A, device)
    start = torch.ones(A, dtype=torch.bool, device=device)
    history, t0 = [], time.perf_counter()
    ep_food = torch.zeros(A, device=device)
    finished: list[float] = []
    for update in range(cfg.updates):
        frac = update / cfg.updates
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (1 - frac)
        buf = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "dones", "starts")}
        h0 = h.detach()
        with torch.no_grad():
            for _ in range(cfg.rollout):
                h = h * (~start).unsqueeze(-1).float()
                logits, value, h = policy.step(obs, h)
                action = sample(logits, gen)
                logp, _ = log_prob_entropy(logits, action)
                nobs, reward, done, info = env.step(action.reshape(cfg.n_envs, cfg.n_fish, -1))
                done_a = done.repeat_interleave(cfg.n_fish)
                for k, v in (("obs", obs), ("actions", action), ("logp", logp), ("values", value),
                             ("rewards", reward.reshape(A)), ("dones", done_a), ("starts", start)):
                    buf[k].append(v)
                ep_food += info["ate"].reshape(A)
                if done_a.any():
                    finished.extend(ep_food[done_a].tolist())
                    ep_food[done_a] = 0
                obs, start = nobs.reshape(A, -1), done_a
            last_value = policy.step(obs, h * (~start).unsqueeze(-1).float())[1]
        batch = {k: torch.stack(v) for k, v in buf.items()}
        batch["advantages"], batch["returns"] = gae(batch["rewards"], batch["values"], batch["dones"], last_value, ppo.gamma, ppo.lam)
        batch["h0"] = h0
        stats = ppo_update(policy, opt, ppo, batch, gen)
        if (update + 1) % max(1, cfg.updates // 20) == 0 or update + 1 == cfg.updates:
            recent = finished[-4 * A:]
            row = {"update": update + 1, "env_steps": (update + 1) * cfg.rollout * cfg.n_envs,
                   "reward_per_step": round(batch["rewards"].mean().item(), 4),
                   "food_per_fish_episode": round(sum(recent) / len(recent), 3) if recent else None,
                   "eod_rate": round(batch["actions"][..., 2].float().mean().item(), 4),
                   **{k: round(v, 4) for k, v in stats.items()}, "seconds": round(time.perf_counter() - t0, 1)}
            history.append(row)
            log(row)
    return policy, {"history": history, "seconds": round(time.perf_counter() - t0, 1),
                    "env_steps": cfg.updates * cfg.rollout * cfg.n_envs}


@torch.no_grad()
def rollout_episodes(cfg: EfishConfig, policy: GRUPolicy | None, food: str, device: torch.device, *, seed: int,
                     eod_off: bool = False, comm_off: bool = False) -> dict:
    """One full episode in each of ``cfg.eval_envs`` fresh tanks: the EOD record [T, B, N], the
    food eaten per fish [B, N] (events after an environment's episode ends are dropped) and the
    fish's sizes [B, N]. ``policy=None``: uniformly random actions; ``eod_off``: the policy's EODs
    forced to 0; ``comm_off``: its communication receptors read 0 (it cannot hear the others' EODs;
    its active sense still gets their echoes)."""
    env = ForagingEnv(env_config(cfg, food=food, n_envs=cfg.eval_envs), seed=seed, device=device)
    B, N = cfg.eval_envs, cfg.n_fish
    c = env.cfg
    comm = slice(c.active_receptors + c.passive_receptors, c.active_receptors + c.passive_receptors + c.comm_receptors * (N - 1))
    gen = torch.Generator(device=device).manual_seed(seed)
    obs = env.reset().reshape(B * N, -1)
    size = env.size.clone()
    h = policy.initial_state(B * N, device) if policy is not None else None
    live = torch.ones(B, dtype=torch.bool, device=device)
    food_eaten = torch.zeros(B, N, device=device)
    eods = []
    for _ in range(cfg.episode_steps):
        if policy is None:
            action = torch.stack([torch.randint(0, n, (B * N,), generator=gen, device=device) for n in ACTION_SIZES], -1)
        else:
            if comm_off:
                obs[:, comm] = 0
            logits, _, h = policy.step(obs, h)
            action = sample(logits, gen)
        if eod_off:
            action[:, 2] = 0
        obs, _, done, info = env.step(action.reshape(B, N, -1))
        obs = obs.reshape(B * N, -1)
        food_eaten += info["ate"] * live[:, None]
        eods.append(torch.where(live[:, None], info["eod"], torch.full_like(info["eod"], float("nan"))))
        live &= ~done
        if not live.any():
            break
    return {"eod": torch.stack(eods), "food": food_eaten, "size": size}


def analyse(ep: dict) -> dict:
    """Food, EOD rate, IDIs, dominance and freeloading of one set of evaluation episodes. Food is
    counted per episode and per 100 steps (a tank whose food is gone ends its episode early, so the
    rate still separates policies that all empty their tanks)."""
    eod, food = ep["eod"], ep["food"]
    valid = ~eod.isnan()
    e = eod.nan_to_num(0.0)
    steps = valid.sum(0).clamp_min(1)  # [B, N]
    rate = e.sum(0) / steps  # per fish-episode
    N = rate.shape[1]
    others = (rate.sum(1, keepdim=True) - rate) / max(N - 1, 1)
    live = valid[:, :, 0].sum(0).float()  # steps each tank's episode lasted (it ends when the food is gone)
    out = {"food_per_fish": round(food.mean().item(), 3),
           "food_per_fish_per_100_steps": round(100 * food.sum().item() / (N * live.sum().item()), 4),
           "episode_steps": round(live.mean().item(), 1),
           "eod_rate": round(e.sum().item() / valid.sum().item(), 4)}
    if N > 1:
        # dominance: within a tank, food against body size (both relative to the tank's mean)
        size = ep["size"]
        largest = size.argmax(1, keepdim=True)
        total = food.sum(1)
        share = (food.gather(1, largest).squeeze(1) / total.clamp_min(1e-9))[total > 0]
        out.update(food_vs_relative_size_r=_round(_pearson((food - food.mean(1, keepdim=True)).flatten(),
                                                          (size - size.mean(1, keepdim=True)).flatten()), 4),
                   food_share_of_largest=round(share.mean().item(), 4) if len(share) else None)
        # freeloading: EOD probability at t given whether any neighbour emitted at t - 1
        prev_other = (e.sum(2, keepdim=True) - e)[:-1] > 0
        cur, ok = e[1:], valid[1:] & valid[:-1]
        p_after = (cur * (prev_other & ok)).sum() / (prev_other & ok).sum().clamp_min(1)
        p_quiet = (cur * (~prev_other & ok)).sum() / (~prev_other & ok).sum().clamp_min(1)
        out.update(eod_rate_vs_neighbours_r=_round(_pearson(rate.flatten(), others.flatten()), 4),
                   eod_prob_after_neighbour_eod=round(p_after.item(), 4), eod_prob_after_quiet=round(p_quiet.item(), 4),
                   food_vs_own_eod_rate_r=_round(_pearson(food.flatten(), rate.flatten()), 4),
                   food_vs_neighbour_eod_rate_r=_round(_pearson(food.flatten(), others.flatten()), 4))
    idi = inter_discharge_intervals(e)
    if len(idi) >= 50 and len(np.unique(idi)) > 1:
        out["idi"] = {"count": int(len(idi)), "mean": round(float(idi.mean()), 3),
                      "cv": round(float(idi.std() / idi.mean()), 3), "max": int(idi.max()),
                      "power_law": fit_discrete_power_law(idi)}
    return out


def env_speed(cfg: EfishConfig, device: torch.device, backend: str | None, steps: int) -> float:
    """Environment steps per second (all tanks, random actions) with ``electric_image`` on ``backend``."""
    env = ForagingEnv(env_config(cfg, backend=backend), seed=cfg.seed, device=device)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = [torch.stack([torch.randint(0, n, (cfg.n_envs, cfg.n_fish), generator=gen) for n in ACTION_SIZES], -1).to(device)
               for _ in range(steps + 2)]
    env.step(actions[0])
    env.step(actions[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a in actions[2:]:
        env.step(a)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.n_envs / (time.perf_counter() - t0)


def run_config(cfg: EfishConfig, out_dir: Path, *, log=print) -> dict:
    """Trains the shared GRU policy, evaluates it (and its EOD-off and random controls) on fresh
    patchy and uniform tanks, writes ``summary.json`` and the policy's state dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    summary = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
               "env": dataclasses.asdict(env_config(cfg))}
    speed_steps = 20 if cfg is QUICK else 100
    fused, ref = env_speed(cfg, device, None, speed_steps), env_speed(cfg, device, "reference", speed_steps)
    summary["env_speed"] = {"env_steps_per_s_fused": round(fused, 1), "env_steps_per_s_reference": round(ref, 1),
                            "speedup": round(fused / ref, 2), "n_envs": cfg.n_envs}
    log({"env_speed": summary["env_speed"]})
    policy, summary["training"] = train(cfg, device, log)
    torch.save(policy.state_dict(), out_dir / "policy.pt")
    policy.eval()
    evals = {}
    for food in ("patchy", "uniform"):
        seed = cfg.seed + (1000 if food == "patchy" else 2000)
        evals[food] = {"trained": analyse(rollout_episodes(cfg, policy, food, device, seed=seed)),
                       "eod_off": analyse(rollout_episodes(cfg, policy, food, device, seed=seed, eod_off=True)),
                       "comm_off": analyse(rollout_episodes(cfg, policy, food, device, seed=seed, comm_off=True)),
                       "random": analyse(rollout_episodes(cfg, None, food, device, seed=seed))}
        log({"eval": food, **{k: v["food_per_fish_per_100_steps"] for k, v in evals[food].items()}})
    summary["evaluation"] = evals
    tr = {f: evals[f]["trained"] for f in evals}
    summary["headline"] = {
        "food_per_fish_per_100_steps": {f: {k: evals[f][k]["food_per_fish_per_100_steps"] for k in evals[f]} for f in evals},
        "eod_rate": {f: tr[f]["eod_rate"] for f in tr},
        "idi_power_law_alpha": {f: tr[f].get("idi", {}).get("power_law", {}).get("alpha") for f in tr},
        "eod_rate_vs_neighbours_r": {f: tr[f].get("eod_rate_vs_neighbours_r") for f in tr},
        "food_vs_relative_size_r": {f: tr[f].get("food_vs_relative_size_r") for f in tr},
        "env_speedup_vs_reference": summary["env_speed"]["speedup"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("efish-marl", "weakly electric fish MARL (arXiv:2511.08436)",
         "a shared GRU policy trained by PPO forages by electrosensing; EOD timing, IDI tails, freeloading")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "efish_marl", __doc__, "runs/efish")


if __name__ == "__main__":
    sys.exit(main())
