"""Recurrent PPO with parameter sharing for the electric-fish reproduction: one GRU policy drives
every fish of every environment (each fish an independent agent with its own hidden state and its
own reward, as in the paper's shared-RNN MARL), trained on whole rollout sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class GRUPolicy(nn.Module):
    """obs -> Linear + tanh -> GRU cell -> factored categorical actions and a value.

    ``action_sizes``: the number of choices of each action component (the logits of all
    components are one vector, split in order)."""

    def __init__(self, obs_dim: int, action_sizes: tuple[int, ...], hidden: int = 128):
        super().__init__()
        self.action_sizes, self.hidden = tuple(action_sizes), hidden
        self.encoder = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh())
        self.gru = nn.GRUCell(hidden, hidden)
        self.actor = nn.Linear(hidden, sum(self.action_sizes))
        self.critic = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.actor.weight, 0.01)
        nn.init.zeros_(self.actor.bias)

    def initial_state(self, n: int, device=None) -> torch.Tensor:
        return torch.zeros(n, self.hidden, device=device)

    def step(self, obs: torch.Tensor, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One step for a batch of agents: (logits per component, value [A], next state)."""
        h = self.gru(self.encoder(obs), h)
        return list(self.actor(h).split(self.action_sizes, -1)), self.critic(h).squeeze(-1), h

    def sequence(self, obs: torch.Tensor, h0: torch.Tensor, starts: torch.Tensor):
        """Logits and values over a rollout ``obs`` [T, A, D] from state ``h0`` [A, H]; the state is
        zeroed before every step where ``starts`` [T, A] is True (a new episode)."""
        logits, values, h = [], [], h0
        for t in range(obs.shape[0]):
            h = h * (~starts[t]).unsqueeze(-1).to(h.dtype)
            lg, v, h = self.step(obs[t], h)
            logits.append(lg)
            values.append(v)
        return [torch.stack([lg[k] for lg in logits]) for k in range(len(self.action_sizes))], torch.stack(values)


def sample(logits: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """One action per component: [..., len(logits)] int64."""
    out = []
    for lg in logits:
        p = lg.softmax(-1)
        out.append(torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1]))
    return torch.stack(out, -1)


def log_prob_entropy(logits: list[torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint log-probability of ``actions`` [..., K] under the factored distribution, and its entropy."""
    logp = ent = 0
    for k, lg in enumerate(logits):
        ls = lg.log_softmax(-1)
        logp = logp + ls.gather(-1, actions[..., k : k + 1]).squeeze(-1)
        ent = ent - (ls.exp() * ls).sum(-1)
    return logp, ent


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [T, A] rollouts; ``dones[t]``: the episode ended with
    step t (no bootstrap across it). Returns (advantages, returns)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_adv, next_value = torch.zeros_like(last_value), last_value
    for t in reversed(range(T)):
        keep = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * keep * next_value - values[t]
        next_adv = delta + gamma * lam * keep * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv, adv + values


@dataclass(frozen=True)
class PPOConfig:
    rollout: int = 128  # steps per update
    epochs: int = 4
    minibatches: int = 4  # split over agents; sequences stay whole
    lr: float = 1e-3
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5


def ppo_update(policy: GRUPolicy, opt: torch.optim.Optimizer, cfg: PPOConfig, batch: dict,
               generator: torch.Generator | None = None) -> dict:
    """``cfg.epochs`` passes of clipped PPO over a rollout ``batch`` (obs [T, A, D], actions
    [T, A, K], logp, values, advantages, returns [T, A], starts [T, A], h0 [A, H])."""
    A = batch["obs"].shape[1]
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
    n = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(A, generator=generator, device=generator.device if generator is not None else "cpu")
        for idx in perm.chunk(cfg.minibatches):
            logits, values = policy.sequence(batch["obs"][:, idx], batch["h0"][idx], batch["starts"][:, idx])
            logp, ent = log_prob_entropy(logits, batch["actions"][:, idx])
            adv = batch["advantages"][:, idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            ratio = (logp - batch["logp"][:, idx]).exp()
            policy_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
            value_loss = 0.5 * (values - batch["returns"][:, idx]).pow(2).mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * ent.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            stats["policy_loss"] += policy_loss.item()
            stats["value_loss"] += value_loss.item()
            stats["entropy"] += ent.mean().item()
            stats["clip_fraction"] += ((ratio - 1).abs() > cfg.clip).float().mean().item()
            n += 1
    return {k: v / n for k, v in stats.items()}
