"""The one config schema: a typed dataclass per config.json section. Every default, and why it is the default,
lives here. Loading JSON into these classes and checking values is settings.py's job; nothing here imports more
than the standard library, so `--help` and validation stay instant.

Precedence of settings: defaults (these dataclasses) < config.json < ablation profile < command line (--set).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    # A local directory (relative paths are resolved against the directory holding config.json) or a hub id.
    model_name_or_path: str
    # Gemma 2 needs eager (its attention soft-capping; transformers refuses sdpa for it). Gemma 3 and 4 have no
    # soft-capping: sdpa gives the same results and is faster. Vision/audio towers always get eager (frozen, unused).
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    # Weights are loaded in this dtype and DeepSpeed trains in it: bfloat16 is Gemma's native precision.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Where the tokenizer is, when not beside the model (null: model_name_or_path). Handy for --dry_run of a model
    # directory that holds only its config.json.
    tokenizer_name_or_path: str | None = None


@dataclass
class FieldNames:
    """The column names of the data files, for files that name the record fields differently. The field names of
    this class are the canonical record fields the rest of the code reads."""

    profile: str = "profile"
    history: str = "history"
    query: str = "query"
    target: str = "target"
    id: str = "id"


@dataclass
class DataConfig:
    train_file: str
    validation_file: str | None = None
    test_file: str | None = None
    fields: FieldNames = field(default_factory=FieldNames)
    # An id in two files, or a train example identical to a validation or test one (profile, history, query and
    # target), makes the evaluation measure memory: such data is refused unless this is true (recorded in results.json).
    allow_overlap: bool = False
    # Where prepared splits (checked, encoded, as Arrow) are kept and reused by every run that asks for the same
    # (data.py, data_cache.py); relative to config.json. Null: <HF datasets cache>/gemma_prepared. On several nodes,
    # storage they share makes one node prepare for all.
    cache_dir: str | None = None
    # Processes that prepare a split. Null: one per CPU (at most 8) for files of 20,000 records or more, else one.
    preprocessing_num_workers: int | None = None


@dataclass
class PromptConfig:
    """What the prompt holds. Ablation profiles override any of these keys (see prompts.SECTIONS for the sections:
    each include_<section> shows the record field of that name)."""

    include_profile: bool = True
    include_history: bool = True
    # Keep at most this many history items (null: all that fit in max_length).
    max_history_items: int | None = None
    # Which history items a prompt keeps when not all fit (max_length) or max_history_items caps them: "recent", the
    # most recent; "bm25", the most relevant to the record's query by BM25 over the items' values (LaMP's retrieval,
    # with rank_bm25's BM25Okapi), ties going to the more recent. Either way the kept items are shown oldest first.
    history_selection: Literal["recent", "bm25"] = "recent"
    # A system text: in the system turn where the chat template has one (Gemma 4), else at the start of the user
    # turn, before the sections (Gemma 1-3). The same in every ablation unless a profile sets it.
    system: str | None = None
    # The task text, always the first paragraph of the user turn, before the sections (after a system text that joins
    # the user turn): the same place in every Gemma, right above the data it is about. Null: none.
    instruction: str | None = None
    # Which attributes of an object profile, and of object history items, are shown, in this order (null: all of them,
    # in the record's order). The names are checked against the training file before the model loads; a record that
    # lacks one shows the others. Lets an ablation measure what one attribute is worth.
    profile_fields: list[str] | None = None
    history_fields: list[str] | None = None
    # Passed to chat templates that can think first (Gemma 4): off, so that the model answers at once, as the
    # training targets do.
    enable_thinking: bool = False

    def with_every_section(self) -> PromptConfig:
        """The full prompt: every section, every attribute, all the history, with this prompt's texts (system,
        instruction). Which examples fit in max_length (and how many history items they keep) is decided on it, for
        config.json's prompt, so that every ablation keeps the same examples."""
        return dataclasses.replace(self, include_profile=True, include_history=True, max_history_items=None,
                                   profile_fields=None, history_fields=None)


@dataclass
class TrainingConfig:
    # Prompt + target tokens per example; over-long examples lose their oldest history items first. Lower it on OOM.
    max_length: int = 512
    # Per-device micro-batch: the first knob for an OOM (memory grows linearly with batch_size x max_length).
    batch_size: int = 4
    eval_batch_size: int = 8
    # Keeps the global batch when batch_size is lowered: global = batch_size x accumulation x processes.
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    # A positive max_steps overrides num_train_epochs (handy for quick runs).
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    # Evaluate on the validation file every eval_steps optimizer steps (null: only at the end).
    eval_steps: int | None = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    seed: int = 42
    # Where the Trainer reports metrics: "none", "tensorboard", "wandb", ...
    report_to: list[str] = field(default_factory=lambda: ["none"])
    # Recompute each decoder layer in backward instead of storing its activations: a large memory saving for ~30% compute.
    activation_checkpointing: bool = True
    # Batch examples of similar length together (random groups, reshuffled every epoch): little padding, the same
    # examples and labels. The longest batch comes first, so an out-of-memory shows at step 1, not hours in. Grouped by
    # the full prompt's length, so that every ablation gets the same batches.
    group_by_length: bool = True
    # Concatenate each micro-batch into one row without padding. "auto": only with flash_attention_2, whose kernels
    # keep the sequences apart for free; eager and sdpa also handle it (a block mask over the row), but their attention
    # then costs (batch_size x length)^2 instead of batch_size x length^2.
    padding_free: Literal["auto", True, False] = "auto"

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * processes


@dataclass
class DeepSpeedChoices:
    """What the generated ZeRO-3 config offloads. Ignored when --deepspeed_config is given."""

    # Optimizer states (12 bytes/parameter in fp32 Adam) live in CPU memory and the Adam step runs on the CPU.
    # "auto": offload only when the memory estimate (see --dry_run) says the model states do not fit on the GPUs.
    offload_optimizer: Literal["auto", True, False] = True
    # Parameters live in CPU memory and are fetched to the GPU layer by layer: fits huge models, costs PCIe bandwidth.
    offload_params: Literal["auto", True, False] = True
    # Page-locked CPU buffers make the offload copies faster (no effect on CPU-only machines).
    pin_memory: bool = True
    # Keep the activations that checkpointing saves (each decoder layer's inputs) in CPU memory instead of the GPU.
    cpu_checkpointing: bool = True


# evaluation.answer_choices "auto": more distinct training targets than this are free text, not a closed answer set
# (a 1-5 rating has 5, a genre a few dozen at most; each choice costs a forward per test example).
MAX_AUTO_CHOICES = 20


@dataclass
class EvaluationConfig:
    """Test-set evaluation at the end of training (and with --do_eval_only)."""

    # Evaluate (loss and greedy answer) at most this many test examples, the first ones in file order (null: all).
    max_test_examples: int | None = None
    # Greedy decoding stops at <end_of_turn>, or after this many new tokens.
    max_new_tokens: int = 32
    # A closed answer set: each test example's choices are scored by the model's log-likelihood and the most likely
    # one is the answer, instead of greedy generation (exact, and gives the probabilities AUC and expected ratings
    # need). A list of the answers, e.g. ["no", "yes"] (every test target must be one); "auto": the distinct training
    # targets when there are at most MAX_AUTO_CHOICES of them, else free generation; null: free generation.
    answer_choices: Literal["auto"] | list[str] | None = None


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning: the base model stays frozen in 16-bit and only the adapters
    are trained, so gradients and optimizer states exist for the adapters alone."""

    enabled: bool = False
    # Rank of each adapter pair: its trainable parameters grow linearly with it (r x (in + out) per layer).
    r: int = 16
    # The adapters' output is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear": every linear layer of the language model (attention and MLP projections), never the vision / audio
    # towers nor the output head. Or a list of module names within the language model, e.g. ["q_proj", "v_proj"].
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Modules of the language model trained in full beside the adapters and saved with them, e.g. ["norm"].
    modules_to_save: list[str] = field(default_factory=list)
    # Rank-stabilised scaling, alpha / sqrt(r): lets a higher r learn without retuning the learning rate.
    use_rslora: bool = False


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    prompt: PromptConfig = field(default_factory=PromptConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedChoices = field(default_factory=DeepSpeedChoices)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Ablation:
    """One file of ablation_configs/: a description plus the prompt keys it sets (any PromptConfig key; the ones it
    leaves out keep config.json's value)."""

    name: str
    description: str
    prompt: dict = field(default_factory=dict)
    # config.json's prompt, before this profile and --set: what every ablation of a study shares. The examples kept,
    # and their history items, are decided on its full prompt (with_every_section), never on the ablation's.
    study_prompt: PromptConfig = field(default_factory=PromptConfig)
