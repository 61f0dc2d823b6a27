"""NextLat (Teoh et al., arXiv:2511.05963): next-latent prediction as a drop-in training head.

``NextLatHead`` sits on top of any causal LM that exposes its post-final-norm hidden states
``h_t``. It owns the transition model

    h^_{t+1} = h_t + MLP(LN([h_t ; e(x_{t+1})]))      (3 bias-free linear layers, GELU between)

rolls it out recursively for ``horizon`` = d steps with teacher-forced tokens, and returns

    total = CE(W h_t, x_{t+1})
          + lambda_h  * (1/d) sum_i SmoothL1(h^(i)_{t+i}, stopgrad(h_{t+i}))            (beta = 1)
          + lambda_kl * (1/d) sum_i KL(softmax(W sg(h_{t+i})) || softmax(sg(W) h^(i)_{t+i}))

with the cross-entropy and all d KL terms computed by one fused call of
``fastmodels.ops.linear_cross_entropy_kl`` (no N x V logits; each position's softmax is the KL
teacher of the predicted rows that land on it).

Masks (``loss_mask`` and packed documents):

* ``loss_mask[b, j]`` (bool, default all True) marks token j as a training target. The CE row at
  position t predicts token t+1 and counts iff ``loss_mask[b, t+1]`` and t, t+1 are in the same
  document. The KL term of a predicted state landing on position t+i counts iff that position's
  CE row counts (same mask as the teacher's own CE) and the rollout stays in one document.
* The SmoothL1 term is not masked by ``loss_mask`` (as in the paper); it is only restricted to
  rollouts that stay inside one document.
* Packed sequences: pass ``doc_ids [B, T]`` (document label of each token; a document is a run of
  equal labels, so a label may be reused) or ``doc_start [B, T]`` (True at the first token of each
  document).
* Padding: ``attention_mask [B, T]`` (the Hugging Face one: True/1 for real tokens). A padding
  token takes part in no term: no CE row, KL row or SmoothL1 rollout starts at, ends at or passes
  through one (unlike ``loss_mask``, which leaves SmoothL1 on), and its hidden state is never read
  (it may be anything, NaN included, and gets a zero gradient).

Each term is a mean over its valid rows (SmoothL1: over their elements) per horizon, averaged over
the d horizons; a horizon without a valid row contributes 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastmodels._validation import FLOAT_DTYPES, check_bool, check_float, check_int, check_tensor
from fastmodels.ops.nextlat import linear_cross_entropy_kl


class NextLatOutput(NamedTuple):
    total: torch.Tensor  # ce + lambda_h * latent + lambda_kl * kl
    ce: torch.Tensor  # next-token cross-entropy
    latent: torch.Tensor  # SmoothL1 next-latent loss, averaged over horizons
    kl: torch.Tensor  # KL(teacher || predicted) averaged over horizons


def _weight_and_bias(lm_head):
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    if hasattr(lm_head, "weight"):
        return lm_head.weight, getattr(lm_head, "bias", None)
    raise TypeError(f"lm_head: expected an nn.Linear-like module or a [V, D] weight tensor, got {type(lm_head).__name__}")


def _embed(embedding, input_ids):
    if isinstance(embedding, torch.Tensor):
        if embedding.dim() != 2:
            raise ValueError(f"embedding: expected a [V, E] weight tensor, got shape {list(embedding.shape)}")
        table, lookup = embedding, lambda ids: torch.nn.functional.embedding(ids, embedding)
    elif callable(embedding):
        table, lookup = getattr(embedding, "weight", None), embedding
    else:
        raise TypeError(f"embedding: expected an nn.Embedding-like module or a [V, E] weight tensor, got {type(embedding).__name__}")
    if isinstance(table, torch.Tensor) and table.dim() == 2 and input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack([input_ids.min(), input_ids.max()]).tolist()  # one host sync
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(f"input_ids: expected token ids in [0, {table.shape[0]}) (rows of the embedding), got range [{lo}, {hi}]")
    return lookup(input_ids)


class NextLatHead(nn.Module):
    """Transition model + the NextLat loss (CE + SmoothL1 latent + KL), see the module docstring.

    Args:
        d_model: hidden size D of the LM.
        d_embed: token-embedding size E (default D).
        horizon: rollout depth d >= 1.
        mlp_hidden: transition MLP width (default 4 * D).
        lambda_h, lambda_kl: weights of the latent and KL terms. With ``lambda_kl = 0`` the KL
            term is not computed (its student logits are most of the fused loss's cost) and
            ``kl`` is reported as 0.
        backend: backend of the fused loss (default: the device's preference).
        deterministic: the fused loss's triton reductions without atomics (bit-reproducible);
            None (default): whatever ``torch.use_deterministic_algorithms`` says at each call.
    """

    def __init__(self, d_model: int, d_embed: int | None = None, horizon: int = 1, mlp_hidden: int | None = None,
                 lambda_h: float = 1.0, lambda_kl: float = 1.0, *, backend: str | None = None, deterministic: bool | None = None):
        super().__init__()
        d_model, horizon = check_int(d_model, "d_model", low=1), check_int(horizon, "horizon", low=1)
        d_embed = d_model if d_embed is None else check_int(d_embed, "d_embed", low=1)
        mlp_hidden = 4 * d_model if mlp_hidden is None else check_int(mlp_hidden, "mlp_hidden", low=1)
        lambda_h, lambda_kl = check_float(lambda_h, "lambda_h", low=0.0), check_float(lambda_kl, "lambda_kl", low=0.0)
        self.d_model, self.d_embed, self.horizon = d_model, d_embed, horizon
        if deterministic is not None:
            check_bool(deterministic, "deterministic (a bool, or None for torch's flag)")
        self.lambda_h, self.lambda_kl, self.backend = float(lambda_h), float(lambda_kl), backend
        self.deterministic = deterministic
        self.norm = nn.LayerNorm(d_model + d_embed, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d_model + d_embed, mlp_hidden, bias=False),
            nn.GELU(),
            nn.Linear(mlp_hidden, mlp_hidden, bias=False),
            nn.GELU(),
            nn.Linear(mlp_hidden, d_model, bias=False),
        )

    def transition(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One step: h + MLP(LN([h ; e]))."""
        return h + self.mlp(self.norm(torch.cat([h, e], dim=-1)))

    def _check_hidden(self, hidden) -> None:
        """hidden: a [B, T, d_model] tensor of the parameters' dtype (any float dtype under autocast)."""
        check_tensor(hidden, "hidden")
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden: expected shape [B, T, {self.d_model}], got {list(hidden.shape)}")
        param_dtype = self.norm.weight.dtype
        if hidden.dtype != param_dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise TypeError(f"hidden: expected {param_dtype} (the dtype of this NextLatHead's parameters; convert the "
                            f"head with .to(dtype) or run under torch.autocast), got {hidden.dtype}")

    def rollout(self, hidden: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        """[h^(1), ..., h^(d)]: h^(i) is [B, T - i, D], row j predicting position j + i.

        ``hidden [B, T, D]``; ``emb [B, T, E]`` the embedded tokens (cast to hidden's dtype)."""
        self._check_hidden(hidden)
        B, T, _ = hidden.shape
        check_tensor(emb, "emb", shape=(B, T, self.d_embed), dtypes=FLOAT_DTYPES)
        return self._rollout(hidden, emb.to(hidden.dtype))

    def _rollout(self, hidden: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        """rollout() of inputs already checked and cast (forward's)."""
        T = hidden.shape[1]
        preds, h = [], hidden
        for i in range(1, min(self.horizon, T - 1) + 1):
            h = self.transition(h[:, : T - i], emb[:, i:])
            preds.append(h)
        return preds

    def forward(self, hidden, input_ids, embedding, lm_head, loss_mask=None, doc_ids=None, doc_start=None,
                attention_mask=None) -> NextLatOutput:
        """NextLat loss of ``hidden [B, T, D]`` (post-final-norm states) for ``input_ids [B, T]``.

        ``embedding``: the LM's token embedding (module or [V, E] weight); ``lm_head``: its output
        head (module with ``weight``/``bias`` or a [V, D] weight; may be tied to the embedding).
        ``loss_mask``, ``doc_ids``/``doc_start`` and ``attention_mask`` are [B, T]; see the module
        docstring.
        """
        self._check_hidden(hidden)
        B, T, D = hidden.shape
        check_tensor(input_ids, "input_ids", dtypes=(torch.int32, torch.int64))  # what the embedding lookup takes
        if input_ids.shape != (B, T):
            raise ValueError(f"input_ids: expected shape [{B}, {T}] (that of hidden), got {list(input_ids.shape)}")
        if doc_ids is not None and doc_start is not None:
            raise ValueError("doc_ids and doc_start: pass at most one")
        for name, m in (("loss_mask", loss_mask), ("doc_ids", doc_ids), ("doc_start", doc_start), ("attention_mask", attention_mask)):
            if m is not None and check_tensor(m, name).shape != (B, T):
                raise ValueError(f"{name}: expected shape [{B}, {T}] (that of input_ids), got {list(m.shape)}")
        weight, bias = _weight_and_bias(lm_head)
        emb = _embed(embedding, input_ids).to(hidden.dtype)
        if emb.shape[-1] != self.d_embed:
            raise ValueError(f"embedding: expected {self.d_embed}-dimensional embeddings, got {emb.shape[-1]}")

        # Segments: runs of tokens of one document; each padding token is a segment of its own.
        seg = None
        if doc_ids is not None or doc_start is not None or attention_mask is not None:
            new = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
            new[:, :1] = True  # (T may be 0)
            if doc_ids is not None:
                new[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
            if doc_start is not None:
                new |= doc_start.bool()
            if attention_mask is not None:
                pad = ~attention_mask.bool()
                new |= pad
                new[:, 1:] |= pad[:, :-1]
                # whatever the LM left at padding (NaN from a fully masked attention row) stays out
                hidden = hidden.masked_fill(pad[..., None], 0)
            seg = new.long().cumsum(1)

        def same_doc(i: int) -> torch.Tensor:  # [B, T - i]: positions j .. j + i inside one segment
            if seg is None:
                return torch.ones(B, T - i, dtype=torch.bool, device=hidden.device)
            return seg[:, : T - i] == seg[:, i:]

        # CE rows: every position; position t predicts token t + 1.
        ce_ok = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
        if T > 1:
            nxt = same_doc(1)
            if loss_mask is not None:
                nxt = nxt & loss_mask[:, 1:].bool()
            ce_ok[:, :-1] = nxt
        ignore = -100
        targets = torch.full_like(input_ids, ignore)
        targets[:, :-1] = input_ids[:, 1:]
        targets = torch.where(ce_ok, targets, torch.full_like(targets, ignore))

        preds = self._rollout(hidden, emb)
        d = self.horizon
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        latent = hidden.new_zeros((), dtype=cd)
        rows, teachers, kl_w = [], [], []
        kl_horizons = hidden.new_zeros((), dtype=cd)
        pos = torch.arange(T, device=hidden.device)
        base = (torch.arange(B, device=hidden.device) * T)[:, None]
        for i, h_i in enumerate(preds, start=1):
            ok = same_doc(i)
            target = hidden[:, i:].detach()
            l1 = torch.nn.functional.smooth_l1_loss(h_i.to(cd), target.to(cd), reduction="none", beta=1.0).sum(-1)
            n = ok.sum()
            latent = latent + torch.where(n > 0, (l1 * ok).sum() / (n.clamp_min(1) * D), 0.0)
            kl_ok = ok & ce_ok[:, i:]
            nk = kl_ok.sum()
            rows.append(h_i.reshape(-1, D))
            teachers.append((base + pos[i:][None, :]).reshape(-1))
            kl_w.append((kl_ok.to(cd) / nk.clamp_min(1)).reshape(-1))
            kl_horizons = kl_horizons + (nk > 0).to(cd)
        latent = latent / d

        if preds and self.lambda_kl != 0:
            pred, teacher_index, kl_weight = torch.cat(rows), torch.cat(teachers), torch.cat(kl_w)
        else:  # no KL rows: a plain fused cross-entropy (kl comes back as 0)
            pred = teacher_index = kl_weight = None
        ce, kl_mean = linear_cross_entropy_kl(hidden.reshape(B * T, D), weight, targets.reshape(-1), pred, teacher_index,
                                              bias=bias, kl_weight=kl_weight, ignore_index=ignore, backend=self.backend,
                                              deterministic=self.deterministic)
        # The op averages the per-horizon means over the horizons that have a valid row.
        kl = kl_mean * kl_horizons / d
        total = ce + self.lambda_h * latent + self.lambda_kl * kl
        return NextLatOutput(total, ce, latent, kl)
