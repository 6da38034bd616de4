"""Configuration of the RLP objective: rollout, reward and loss knobs, paper defaults (docs/method.md)."""

from __future__ import annotations

import dataclasses

POSITION_RULES = ("uniform", "ema_band", "window")
PROMPT_STYLES = ("none", "chat", "text")
DEFAULT_SYSTEM = ("You are reading a document and continuing it. Before the next word, think briefly between "
                  "{think_start} and {think_end} about what comes next, then continue the text.")
REWARD_KINDS = ("info_gain", "rpt")
BASELINES = ("group", "batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Where to think and how to sample thoughts (docs/method.md steps 1-2).

    Attributes:
      group_size: G, thoughts sampled per position (>= 2; paper 16).
      positions_per_doc: K, positions per document (paper: 1 per (context, next token) example).
      docs_per_row: D. 0 (the default): K positions per row, drawn over all the documents packed in it (they
        compete; with `data.packing=window` a row is one document, so this is K per document). D >= 1: K
        positions in each of a row's first D documents (segment ids 1..D), [B, D*K] slots, masked where a row
        holds fewer documents or a document fewer valid positions: the paper's rule in packed rows, at D*K*G
        thoughts per row (`positions_per_row`).
      thought_len: T_think, maximum thought tokens before `</think>` is forced (paper 2048).
      temperature: sampling temperature (paper 0.7). Log-probs of thought tokens are those of the
        temperature-scaled distribution, in the sampler and in the loss alike.
      top_p, top_k: nucleus / top-k truncation of sampling (1.0 / 0 = off, the paper's choice).
      min_context: a position t needs at least this many tokens of its document before it.
      position_rule: "uniform" over valid positions (the paper's rule, the default); "ema_band": only
        positions whose no-think EMA surprise -log p_ema(x_t | x_<t) lies in `ema_band`. ema_band
        conditions on the *realised* next token, not only on the context (a context with p(A) = 0.9 is
        picked only when the rarer B occurs), which biases the reward away from Prop. 1's expectation:
        a knob for experiments, not the method. "window": every position of a window of K consecutive
        valid positions at a random start. Held-out evaluation never uses ema_band's model-dependent
        choice: it draws uniformly with a fixed key (`positions.eval_positions`).
      ema_band: (low, high) nats for "ema_band".
      word_starts: only positions t whose token x_t begins a word (a space marker then a letter or digit in
        the tokenizer's vocabulary: `Tokenizer.word_start_ids`), under any rule, in training and held-out
        evaluation alike: no thought before a bare space, punctuation, or a piece inside a word or number,
        where the next token is settled by the text. It reads the vocabulary, not the model, so every model
        is still scored at the same positions. Off by default (the paper places thoughts anywhere).
      banned_ids: further token ids never sampled inside a thought (besides `<think>`, and `</think>`
        in the first slot). The markers themselves come from the tokenizer (`model.think_tokens`), never
        from here: see `rlp_jax.rlp.think_ids`.
      ban_special_tokens: the tokenizer's special tokens other than the markers (eos, bos, pad and
        chat-control tokens such as `<|im_start|>`) are banned too (`think_ids.think_ids`), so that no
        thought contains an end of document or a chat turn (on by default; the published replication
        of the small model ran without it and sets it off, see experiments/replication/REPORT.md).
    """

    group_size: int = 16
    positions_per_doc: int = 1
    docs_per_row: int = 0
    thought_len: int = 2048
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_context: int = 16
    position_rule: str = "uniform"
    ema_band: tuple[float, float] = (1.0, 8.0)
    word_starts: bool = False
    banned_ids: tuple[int, ...] = ()
    ban_special_tokens: bool = True

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size (G) must be >= 2 for group-relative advantages, "
                             f"got {self.group_size}")
        if self.positions_per_doc < 1 or self.thought_len < 1 or self.min_context < 1:
            raise ValueError("rollout.positions_per_doc, rollout.thought_len and rollout.min_context must be >= 1")
        if self.docs_per_row < 0:
            raise ValueError(f"rollout.docs_per_row must be >= 0 (0 = positions per row), got {self.docs_per_row}")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.position_rule not in POSITION_RULES:
            raise ValueError(f"rollout.position_rule must be one of {POSITION_RULES}, got {self.position_rule!r}")
        if not self.ema_band[0] < self.ema_band[1]:
            raise ValueError(f"rollout.ema_band must be (low, high) with low < high, got {self.ema_band}")

    @property
    def positions_per_row(self) -> int:
        """Position slots of a row: K, or D*K with docs_per_row = D."""
        return self.positions_per_doc * max(1, self.docs_per_row)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Attributes:
      kind: "info_gain" (RLP: S_pred - S_ema) or "rpt" (1 if the policy's argmax after the thought is x_t).
      horizon: H, next tokens scored after the thought (1 = the paper).
    """

    kind: str = "info_gain"
    horizon: int = 1

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward.kind must be one of {REWARD_KINDS}, got {self.kind!r}")
        if self.horizon < 1:
            raise ValueError(f"reward.horizon must be >= 1, got {self.horizon}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Attributes:
      eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the importance ratio.
      kl_beta: beta, weight of the per-token KL to a fixed reference: a frozen copy of the
        initial params, kept only when beta > 0 (paper: 0).
      ntp_weight: lambda, weight of next-token cross-entropy added to the RLP loss (0 = pure RLP).
      baseline: "group" (leave-one-out within G, the paper) or "batch" (centre over all thoughts).
      std_normalize: divide advantages by their group's (or batch's) std.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.0
    ntp_weight: float = 0.0
    baseline: str = "group"
    std_normalize: bool = False

    def __post_init__(self):
        if self.eps_low < 0 or self.eps_high < 0 or self.eps_low >= 1:
            raise ValueError(f"loss.eps_low must be in [0, 1) and loss.eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.kl_beta < 0 or self.ntp_weight < 0:
            raise ValueError("loss.kl_beta and loss.ntp_weight must be >= 0")
        if self.baseline not in BASELINES:
            raise ValueError(f"loss.baseline must be one of {BASELINES}, got {self.baseline!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """The paper's prompted setting (docs/method.md step 1): an instruction that the policy reads before
    every document when it samples and scores thoughts (`rlp_jax.rlp.prompt`).

    Attributes:
      style: "none" (no prompt), "chat" (the tokenizer's own chat template with `system` as the system
        message and `user` as the user turn, then the assistant turn the document continues) or
        "text" (`system` and a blank line, as plain text, for base models without a template).
      system, user: the instruction texts; `{think_start}` / `{think_end}` become the marker strings.
      teacher_sees: the EMA teacher's no-think prediction S_ema also reads the prompt (default: no,
        the teacher predicts the plain text).
    Its token ids are rendered with the run's tokenizer (`rlp_jax.rlp.think_ids.think_ids`).
    """

    style: str = "none"
    system: str = DEFAULT_SYSTEM
    user: str = "Continue the text."
    teacher_sees: bool = False

    def __post_init__(self):
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"rlp.prompt.style must be one of {PROMPT_STYLES}, got {self.style!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLPConfig:
    """The whole objective. ema_decay: tau of phi <- tau * phi + (1 - tau) * theta (paper 0.999)."""

    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    loss: LossConfig = LossConfig()
    prompt: PromptConfig = PromptConfig()
    ema_decay: float = 0.999

    def __post_init__(self):
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"rlp.ema_decay must be in [0, 1], got {self.ema_decay}")
