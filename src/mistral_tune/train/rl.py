"""Method grpo, one optimizer step at a time: rollout -> reward -> loss.

Rollout: the step's prompts (data/prompts.py) each get grpo.num_generations completions, sampled by
the decoding engine (generate/run.py generate_batch) on the policy's own weights, adapters unmerged.
The seeds come from (seed, step, rank): a resumed run samples exactly what an uninterrupted one
would. Reward: the reward functions (train/rewards.py) score each completion; the advantages are
normalised within each prompt's group (train/objectives.py grpo_advantages). Loss: the policy's
per-token log-probabilities of the sampled tokens, computed again in the training forward
(models/mistral.py target_logprobs), go into the clipped policy-gradient loss (grpo_loss), divided
by the whole step's completions or tokens over every process, so that micro-batches and processes
add up to one batch.

With num_iterations > 1 a rollout serves that many optimizer steps; its log-probabilities at rollout
are kept as the old policy's, and the rollout travels in the checkpoint (state.json) so that a run
stopped between them resumes on the same completions. With grpo.beta > 0 the reference's
log-probabilities are taken at rollout with the adapters switched off (models/lora.py
adapters_disabled): the base model, no second copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.pack import Sample, collate
from ..data.prompts import PromptDataset
from ..errors import ConfigError
from ..generate.run import generate_batch
from ..models.lora import adapters_disabled
from .objectives import grpo_advantages, grpo_loss, grpo_normaliser
from .rewards import Rewards

FAILURES_SHOWN = 5  # reward failures echoed per reward function; every one is in reward_failures.jsonl


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The first sampling seed of a rollout (completion i samples with it + i): a function of the run's
    seed, the step that made the rollout and the process, below 2**62 as the decoder's seeds are."""
    digest = hashlib.sha256(f"grpo:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 3


@dataclass
class Rollout:
    """The completions of one rollout, group by group (each prompt's num_generations side by side),
    and what the loss reads beside the policy's log-probabilities."""

    epoch: int
    groups: list[list[list[int]]]  # the micro-batches of prompt rows the step drew (RowStream's)
    prompts: list[list[int]]  # per completion: its prompt's ids
    completions: list[list[int]]  # sampled ids, the end-of-sequence token included when it ended there
    advantages: list[float]
    old: list[list[float]] | None = None  # per-token log-probabilities at rollout (num_iterations > 1)
    ref: list[list[float]] | None = None  # the reference's (grpo.beta > 0)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        return cls(**state)


def completion_logprobs(model, batch, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probabilities of each row's completion tokens (its trained targets, in order),
    zero past each completion's length (lengths (B,); T the longest)."""
    hidden = model.hidden_states(batch.input_ids, batch.position_ids, batch.seq_ids)
    keep = batch.labels != -100
    flat = model.target_logprobs(hidden[keep], batch.labels[keep])
    mask = torch.arange(int(lengths.max()), device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def _batch(prompts: list[list[int]], completions: list[list[int]], padding: dict):
    samples = [Sample.from_ids(p + c, [False] * len(p) + [True] * len(c)) for p, c in zip(prompts, completions,
                                                                                         strict=True)]
    return collate(samples, [[i] for i in range(len(samples))], **padding)


def _padded(rows: list[list[float]], device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)


class GRPO:
    """The grpo state of a run: the reward functions, the rollout in use, the failures reported."""

    def __init__(self, cfg: Config, rt, model, tokenizer, data: PromptDataset, echo, out: Path) -> None:
        self.cfg, self.rt, self.model, self.tokenizer, self.data, self.echo = cfg, rt, model, tokenizer, data, echo
        self.out = out
        self.rewards = Rewards(cfg.grpo.rewards)  # a bad reward is a ConfigError now, before any output
        self.rollout: Rollout | None = None
        self.failures_shown: dict[str, int] = {}
        if rt.sharded:
            raise ConfigError("method grpo runs on a whole model per process (distributed: ddp or one process); "
                              "a sharded one (fsdp) is not supported")

    # ------------------------------------------------------------------ the step's prompts
    def window(self, step: int, draw) -> tuple[int, list[list[list[int]]]]:
        """(epoch, micro-batches of prompt rows) of `step`: drawn from the row stream (draw()) at a
        rollout step, else those of the rollout in use."""
        if step % self.cfg.grpo.num_iterations == 0 or self.rollout is None:
            self.rollout = None
            drawn = draw()
            return drawn[-1][0], [g for _, g in drawn]
        return self.rollout.epoch, self.rollout.groups

    def state_dict(self, steps_done: int) -> dict | None:
        """What a checkpoint after `steps_done` steps keeps: the rollout, while later steps still use it."""
        if self.rollout is None or steps_done % self.cfg.grpo.num_iterations == 0:
            return None
        return self.rollout.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.rollout = Rollout.from_state(state) if state else None

    # ------------------------------------------------------------------ rollout and rewards
    def _make_rollout(self, step: int, epoch: int, groups, padding: dict, metrics: dict) -> Rollout:
        cfg, g, rt = self.cfg, self.cfg.grpo, self.rt
        records = [self.data.train_records[row[0]] for group in groups for row in group]
        prompt_ids = [self.data.train[row[0]].tokens for group in groups for row in group]
        prompts = [p for p in prompt_ids for _ in range(g.num_generations)]
        began = time.perf_counter()
        new = generate_batch(self.model, prompts, g.max_new_tokens, eos_id=self.tokenizer.eos_id,
                             temperature=g.temperature, top_p=g.top_p, seed=rollout_seed(cfg.seed, step, rt.rank),
                             batch_size=g.batch_size, top_k=g.top_k)
        # a completion shorter than max_new_tokens ended on the end-of-sequence token: it is trained too
        ended = [len(c) < g.max_new_tokens for c in new]
        completions = [c + [self.tokenizer.eos_id] if e else c for c, e in zip(new, ended, strict=True)]
        texts = [self.tokenizer.decode(c) for c in new]
        metrics["rollout_s"] = time.perf_counter() - began
        table, failures = self.rewards.score([r for r in records for _ in range(g.num_generations)], texts)
        self._report_failures(step, failures)
        advantages, total, std_zero = grpo_advantages(table, self.rewards.weights, g.num_generations, g.scale_rewards)
        self._reward_sums(metrics, table, total, std_zero, completions, ended)
        rollout = Rollout(epoch, groups, prompts, completions, advantages.tolist())
        if g.num_iterations > 1 or g.beta:
            with torch.no_grad():
                if g.num_iterations > 1:
                    rollout.old = self._logprobs(rollout, padding)
                if g.beta:
                    with adapters_disabled(self.model):
                        rollout.ref = self._logprobs(rollout, padding)
        return rollout

    def _logprobs(self, rollout: Rollout, padding: dict) -> list[list[float]]:
        """Per-token log-probabilities of the rollout's completions under the model as it is now."""
        out: list[list[float]] = []
        size = self.cfg.micro_batch_size * self.cfg.grpo.num_generations
        for a in range(0, len(rollout.completions), size):
            comps = rollout.completions[a:a + size]
            lengths = torch.tensor([len(c) for c in comps])
            batch = _batch(rollout.prompts[a:a + size], comps, padding).to(self.rt.device)
            with self._autocast():
                logp = completion_logprobs(self.model, batch, lengths).float().cpu()
            out += [logp[i, :n].tolist() for i, n in enumerate(lengths.tolist())]
        return out

    def _autocast(self):
        rt = self.rt
        return torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None)

    def _reward_sums(self, metrics: dict, table, total, std_zero, completions, ended) -> None:
        """{metric: (sum, count)} of the rollout, to be summed over processes then divided; squares too, for stds."""
        sums = metrics.setdefault("sums", {})
        scored = total[~torch.isnan(total)]
        sums["reward"] = (float(scored.sum()), scored.numel())
        sums["reward_sq"] = (float((scored ** 2).sum()), scored.numel())
        for k, name in enumerate(self.rewards.names):
            col = table[:, k]
            ok = col[~torch.isnan(col)]
            sums[f"rewards/{name}/mean"] = (float(ok.sum()), ok.numel())
            sums[f"rewards/{name}/sq"] = (float((ok ** 2).sum()), ok.numel())
            sums[f"rewards/{name}/failed"] = (float(torch.isnan(col).sum()), 1)
        sums["frac_reward_zero_std"] = (float(std_zero.sum()), std_zero.numel())
        sums["completion_length"] = (float(sum(len(c) for c in completions)), len(completions))
        sums["completions/truncated"] = (float(sum(not e for e in ended)), len(ended))

    def _report_failures(self, step: int, failures) -> None:
        if not failures:
            return
        seen = set()
        for f in failures:  # a group's completions share their record: one line for it
            if (f.reward, f.origin, f.error) in seen:
                continue
            seen.add((f.reward, f.origin, f.error))
            shown = self.failures_shown.get(f.reward, 0)
            if shown < FAILURES_SHOWN:
                more = "; later failures of it are only counted here and in reward_failures.jsonl" \
                    if shown + 1 == FAILURES_SHOWN else ""
                self.echo(f"step {step + 1}: {f.line()}; counted as failed (adds 0 to the reward){more}")
            self.failures_shown[f.reward] = shown + 1

        def write() -> None:
            with open(self.out / "reward_failures.jsonl", "a") as fh:
                for f in failures:
                    fh.write(json.dumps({"step": step + 1, **f.__dict__}) + "\n")
        self.rt.on_main(write)

    # ------------------------------------------------------------------ the update
    def accumulate(self, step: int, epoch: int, groups, micro_batch_size: int,
                   padding: dict) -> tuple[float, int, int, dict]:
        """Forward and backward over the step's completions (a new rollout at a rollout step), each
        micro-batch's summed loss terms divided by the step's normaliser over every process. Returns
        (loss, completion tokens, real tokens, metrics) of this process, the loss already divided."""
        g, rt = self.cfg.grpo, self.rt
        metrics: dict = {}
        if self.rollout is None:
            self.rollout = self._make_rollout(step, epoch, groups, padding, metrics)
        ro = self.rollout
        began = time.perf_counter()
        n_seq, n_tok = rt.all_sum([len(ro.completions), sum(len(c) for c in ro.completions)])
        normaliser = grpo_normaliser(g.loss_type, int(n_seq), int(n_tok))
        size = micro_batch_size * g.num_generations
        loss_sum, n_real, sums = 0.0, 0, metrics.setdefault("sums", {})
        starts = list(range(0, len(ro.completions), size))
        for j, a in enumerate(starts):
            comps = ro.completions[a:a + size]
            lengths = torch.tensor([len(c) for c in comps])
            batch = _batch(ro.prompts[a:a + size], comps, padding).to(rt.device)
            with self._autocast():
                logp = completion_logprobs(self.model, batch, lengths).float()
            mask = (torch.arange(logp.shape[1], device=logp.device)[None, :] < lengths.to(logp.device)[:, None]).long()
            old = _padded(ro.old[a:a + size], logp.device) if ro.old is not None else None
            ref = _padded(ro.ref[a:a + size], logp.device) if ro.ref is not None else None
            adv = torch.tensor(ro.advantages[a:a + size], dtype=torch.float32, device=logp.device)
            terms = grpo_loss(logp, old, ref, adv, mask, g.beta, g.epsilon, g.epsilon_high, g.loss_type,
                              g.max_new_tokens)
            term = terms.summed / normaliser
            if j == len(starts) - 1:  # the gradients are complete in this backward: they travel from inside it
                rt.send_during_backward()
            term.backward()
            loss_sum += float(term.detach())
            n_real += batch.n_real
            for k, (total, count) in terms.sums.items():
                before = sums.get(k, (0.0, 0))
                sums[k] = (before[0] + total, before[1] + count)
        metrics["update_s"] = time.perf_counter() - began
        return loss_sum, int(n_tok), n_real, self._step_metrics(metrics)

    def _step_metrics(self, metrics: dict) -> dict[str, float]:
        """The step's means over every process: rewards (mean and std, per function too, failures
        counted), completion length, clip fractions, KL; rollout and update seconds (this process's)."""
        sums = metrics.pop("sums")
        keys = sorted(sums)
        totals = self.rt.all_sum([x for k in keys for x in sums[k]])
        means = {k: float(totals[2 * i]) / max(float(totals[2 * i + 1]), 1) for i, k in enumerate(keys)}
        counts = {k: float(totals[2 * i + 1]) for i, k in enumerate(keys)}
        out: dict[str, float] = {k: float(v) for k, v in metrics.items()}
        for k, v in means.items():
            if k.startswith("rewards/") and k.endswith("/failed"):
                out[k] = float(totals[2 * keys.index(k)])  # a count, over the step's completions
            elif not k.endswith("/sq") and k != "reward_sq" and counts[k]:
                out[k] = v
        for mean_key, sq_key, std_key in [("reward", "reward_sq", "reward_std")] + [
                (f"rewards/{n}/mean", f"rewards/{n}/sq", f"rewards/{n}/std") for n in self.rewards.names]:
            n = counts.get(mean_key, 0)
            if mean_key in means and sq_key in means and n > 1:
                var = (means[sq_key] - means[mean_key] ** 2) * n / (n - 1)
                out[std_key] = math.sqrt(max(var, 0.0))
        return out

    # ------------------------------------------------------------------ held-out reward
    @torch.no_grad()
    def evaluate(self, step: int, log) -> float | None:
        """The held-out prompts' mean reward with greedy answers (one each), logged per reward function;
        None without held-out prompts."""
        data, g = self.data, self.cfg.grpo
        if not data.val:
            return None
        new = generate_batch(self.model, [s.tokens for s in data.val], g.max_new_tokens, eos_id=self.tokenizer.eos_id,
                             batch_size=g.batch_size)
        table, _ = self.rewards.score(data.val_records, [self.tokenizer.decode(c) for c in new])
        total = (table.nan_to_num(0.0) * self.rewards.weights[None, :]).sum(1)
        values = {"eval_reward": float(total.mean())}
        for k, name in enumerate(self.rewards.names):
            values[f"eval_rewards/{name}"] = float(table[:, k].nan_to_num(0.0).mean())
        log.metrics(step, values, f"held-out reward {values['eval_reward']:.4f} (greedy, {len(new)} prompts)")
        return values["eval_reward"]
