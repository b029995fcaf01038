"""The typed configuration tree of a run.

Every section is a keyword-only dataclass so a recipe reads like a table and a typo is an error.
A run's resolved `TrainConfig` is saved with each checkpoint (see `to_dict`), which makes a
checkpoint self-describing: `convert`, `resume` and `export` never need the original YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_keye.config.flavors import vision_flavor_fields


@dataclass(kw_only=True)
class VisionConfig:
    """Shapes of the SigLIP-style vision tower and the `mlp_AR` projector (spec section 1.1-1.2).

    `flavor` names a preset in `config/flavors.py` (VISION_FLAVORS); fields given next to
    it override it. The projector maps 2x2 merged patches to the language model's hidden size.
    """

    flavor: str = "tiny"  # preset in config/flavors.py VISION_FLAVORS: tiny | small | 8b
    hidden_size: int  # ViT width (1152 in Keye-VL-1.5)
    num_layers: int  # ViT encoder layers
    num_attention_heads: int  # ViT heads; head_dim = hidden_size / heads must be a multiple of 4
    ffn_hidden_size: int  # ViT MLP inner width (gelu_pytorch_tanh)
    patch_size: int = 14  # square patch side in pixels (conv kernel and stride)
    num_channels: int = 3  # image channels of a patch row
    position_grid: int = 27  # side of the learned absolute position table (27x27 = 729 entries)
    rope_theta: float = 10000.0  # base of the 2D RoPE (rope dim = head_dim / 2: height then width)
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon of the ViT blocks and the post-layernorm
    spatial_merge_size: int = 2  # projector merges merge x merge patches into one LM token
    projector_norm_eps: float = 1e-5  # LayerNorm epsilon of the projector (over merge^2 * hidden)
    init_std: float = 0.02  # std of the normal weight init (drawn per parameter name)
    # Activation recompute of the ViT layers (megatron-core's): none keeps every layer's
    # activations for all visual patches on the first stage; full keeps only each layer's input
    # and re-runs the layer in the backward pass (as model.recompute=full does for the decoder).
    recompute: Literal["none", "full"] = "none"

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> VisionConfig:
        """A VisionConfig from a named preset plus field overrides."""
        return cls(**{**vision_flavor_fields(name), "flavor": name, **overrides})

    @property
    def head_dim(self) -> int:
        """Per-head width of the ViT attention."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_size(self) -> int:
        """Width of one merged token: spatial_merge_size^2 * hidden_size (4608 in Keye-VL-1.5)."""
        return self.spatial_merge_size**2 * self.hidden_size


@dataclass(kw_only=True)
class ModelConfig:
    """Shapes of the Qwen3 decoder (and, later, the vision tower).

    `flavor` names a preset in `config/flavors.py`; fields given next to it override it.
    """

    flavor: str = "tiny"  # preset in config/flavors.py: tiny | small | 0.6b | 8b
    vocab_size: int  # real vocabulary size (the tokenizer must fit in it)
    hidden_size: int  # decoder width
    num_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_query_groups: int  # key/value heads (GQA)
    head_dim: int  # per-head width (may differ from hidden/heads)
    ffn_hidden_size: int  # SwiGLU inner width
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_base: float = 1_000_000.0  # RoPE base (stage 3 raises it to 8e6)
    # M-RoPE sections over the rotary half-dimension: (t, h, w). Must sum to head_dim // 2.
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 40960  # longest position the model expects
    init_std: float = 0.02  # std of the normal weight init (drawn per parameter name)
    attention_backend: Literal["auto", "sdpa", "flash", "te"] = "auto"  # auto: flash-attn on CUDA in 16-bit, else SDPA
    # Activation recompute (megatron-core's): selective re-runs core attention (ours, context
    # parallel included) in the backward pass; full re-runs every layer from its input.
    recompute: Literal["none", "selective", "full"] = "none"
    # The embedding and output layer hold `padded_vocab_size` rows: `vocab_size` rounded up to a
    # multiple of this (as Megatron-LM's make_vocab_size_divisible_by, but independent of the
    # tensor-parallel degree, so checkpoints reshard). The extra logit columns are masked out of
    # every softmax, and the HF converter adds/cuts the rows.
    make_vocab_size_divisible_by: int = 128
    # One matrix for the token embedding and the output layer (Qwen3-0.6B/1.7B/4B); under
    # pipeline parallelism the last stage holds a copy kept equal by megatron-core.
    tie_word_embeddings: bool = False
    # Precision of the Hugging Face weights this model was imported from (config.json
    # torch_dtype); `convert export` writes it unless told otherwise. None: the run's precision.
    source_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    # What the last stage computes: lm = vocab-parallel logits; value = one scalar score per
    # token from a replicated `value_head` [1, hidden] in place of the output layer (reward
    # models; HF export as Qwen3ForSequenceClassification). Loading an lm checkpoint into a
    # value model keeps the freshly drawn value head.
    output_head: Literal["lm", "value"] = "lm"
    # The vision tower and projector (KeyeVL); None = a text-only model. Fields as
    # model.vision.NAME (flavor, hidden_size, ...); model.vision.recompute: none | full
    # (full re-runs each ViT layer in the backward pass, keeping only its input per patch).
    vision: VisionConfig | None = None
    # Token ids of the vision markers (Keye-VL-1.5's Qwen2 ids; the tiny/small flavors use the
    # shipped tiny tokenizer's). Image and video pads are replaced by vision embeddings.
    image_token_id: int = 151655  # `<|image_pad|>`
    video_token_id: int = 151656  # `<|video_pad|>`
    vision_start_token_id: int = 151652  # `<|vision_start|>`
    vision_end_token_id: int = 151653  # `<|vision_end|>`

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer (`vocab_size` rounded up)."""
        multiple = max(self.make_vocab_size_divisible_by, 1)
        return -(-self.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel degrees. `data` is derived from the world size when left at 0."""

    tensor: int = 1  # tensor-parallel degree
    pipeline: int = 1  # pipeline stages
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    context: int = 1  # context-parallel degree
    # How context-parallel attention exchanges K/V: p2p (ring, zig-zag balanced), a2a (Ulysses;
    # needs KV heads per TP rank divisible by context), allgather, or a2a+p2p (a2a within groups
    # of cp_a2a_size consecutive ranks, ring across them).
    cp_comm: Literal["p2p", "a2a", "allgather", "a2a+p2p"] = "p2p"
    cp_a2a_size: int = 1  # a2a group size under cp_comm=a2a+p2p (divides context)
    data: int = 0  # data-parallel degree; 0 = world size / (tensor * pipeline * context)
    sequence_parallel: bool = False  # shard norms and dropout over the sequence (TP > 1)
    # ZeRO-1: shard Adam state and the fp32 master copy over data-parallel ranks.
    distributed_optimizer: bool = True
    # ZeRO stage over data (x context) ranks: 1 = megatron-core DDP + distributed optimizer
    # (Adam state sharded); 2 = torch FSDP2 through megatron-core (gradients, parameters at
    # rest and Adam state sharded; a layer's gathered parameters live from its forward to its
    # backward); 3 = the same, gathered parameters freed after forward and gathered again in
    # backward. 2 and 3 need distributed_optimizer=true and pipeline=1.
    zero_stage: Literal[1, 2, 3] = 1
    overlap_grad_reduce: bool = False  # reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # all-gather updated ZeRO-1 parameters during the next forward
    ddp_bucket_size: int | None = None  # gradient bucket size in elements; None = megatron default


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW hyper-parameters; weight decay is never applied to norms and biases."""

    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 = off


@dataclass(kw_only=True)
class ScheduleConfig:
    """Batch sizes, run length and the learning-rate schedule."""

    train_iters: int = 100  # optimizer steps in the planned schedule
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    micro_batch_size: int = 1  # sequences per forward/backward pass
    warmup_iters: int = 10  # linear warmup steps
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"  # learning-rate decay after warmup
    # Stop (after saving) once this iteration is reached, leaving the LR schedule as planned for
    # train_iters; e.g. a slurm job that resumes in its next allocation. 0 = never.
    exit_at_iteration: int = 0
    # Length of the final decay phase under `wsd` (warmup-stable-decay).
    wsd_decay_iters: int = 0
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"  # shape of the wsd decay phase


@dataclass(kw_only=True)
class DataSourceConfig:
    """One corpus of preprocessed shards and its share of the blend (`data.kind: shards`)."""

    # A `NAME.index.json` written by `megatron-keye preprocess`, a directory of them, or a
    # tar pattern such as `dir/laion-{000000..000031}.tar` (sample counts then read from the tars).
    path: str
    weight: float = 1.0  # relative share of samples drawn from this source
    name: str | None = None  # label in metrics and logs; default: the index's name or the path


@dataclass(kw_only=True)
class DataConfig:
    """Where batches come from and how long a sequence is."""

    # synthetic_text / text_jsonl: fixed-length text rows; shards: packed multimodal rows read
    # from preprocessed WebDataset shards (`sources`), decoded in loader worker processes.
    kind: Literal["synthetic_text", "text_jsonl", "shards"] = "synthetic_text"
    seq_length: int = 128  # tokens per sequence
    # text_jsonl: a JSONL file (or directory of them) with a "text" field per line.
    path: str | None = None
    # A tokenizer.json directory; None means the small tokenizer the project ships.
    tokenizer: str | None = None
    # synthetic_text: how many documents the generator writes.
    num_documents: int = 2000
    seed: int = 1234  # seed of the data order
    shuffle: bool = True  # shuffle samples each epoch
    # shards: the corpora and their blend weights (stage 3: video:image:text = 24:50:26).
    sources: list[DataSourceConfig] = field(default_factory=list)
    num_workers: int = 2  # shards: DataLoader worker processes per rank (0 = decode in the trainer)
    shuffle_buffer: int = 1000  # shards: per-source shuffle buffer of each stream, in samples
    # shards: logical streams that fix the global sample order for the whole run (saved with the
    # loader state, so a resumed run keeps it); a multiple of data-parallel size x num_workers of
    # every layout the run will use. 0 = data-parallel size x num_workers of the first start.
    num_streams: int = 0
    pack_open_rows: int = 4  # shards: rows the best-fit packer keeps open per stream
    overlong: Literal["truncate", "drop"] = "truncate"  # shards: a sample longer than a row
    prefetch_rows: int = 4  # shards: rows each worker prepares ahead
    image_max_tokens: int = 20480  # shards: LLM tokens of one image at most (keye-vl-utils: 20,480)
    video_max_tokens: int = 65536  # shards: token budget of one video (keye-vl-utils: 65,536)
    # shards: fill each row's ref_logprobs from the reference log-prob sidecars of this tag
    # (`megatron-keye reference-logprobs --out-tag TAG`) for `reference: precomputed`; None = off.
    ref_logprobs: str | None = None


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and loading. `load` may be a directory of checkpoints (its `latest` is used)."""

    save_dir: str | None = None  # this run's checkpoints; a run whose save_dir holds one resumes from it
    save_interval: int = 0  # save every N steps; 0 = only at the end
    save_at_end: bool = True  # save when train_iters is reached
    load: str | None = None  # seeds a fresh run (ignored when save_dir already holds a checkpoint)
    # Load only model weights (fine-tuning from a converted checkpoint): no optimizer, no step.
    # The same as load_state=weights.
    load_weights_only: bool = False
    # What `load` restores when it seeds a new run (a training stage starting from the previous
    # stage): resume = everything (model, optimizer, LR schedule, iteration, data position);
    # weights+optimizer = model and Adam state, with a fresh LR schedule, iteration 0 and a
    # fresh data order (same trainable set as the saved run); weights = model only.
    load_state: Literal["resume", "weights+optimizer", "weights"] = "resume"
    # How the ZeRO-1 optimizer state is laid out on disk. fully_reshardable (default) loads into
    # any TP/PP/DP layout (state is gathered per data-parallel group while saving);
    # dp_reshardable saves without that gather but reloads only with the same TP and PP.
    # (megatron-core 0.16.1 refuses its older fully_sharded_model_space format.)
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    keep_last: int = 0  # keep only the newest N checkpoints; 0 = keep all


@dataclass(kw_only=True)
class LoggingConfig:
    """Console progress line, the metrics file and wandb."""

    log_interval: int = 1  # print and record metrics every N steps
    output_dir: str = "outputs/run"  # metrics.jsonl and wandb files go here
    wandb_project: str | None = None  # wandb project; set = online logging
    # offline unless a project is configured; "disabled" turns wandb off entirely.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: str | None = None  # wandb run name


@dataclass(kw_only=True)
class SFTHeadConfig:
    """Options of the `sft` head (assistant-only next-token loss)."""

    # Per-token weight of sample i with n_i supervised tokens: token = 1, sample = 1/n_i,
    # square = 1/sqrt(n_i) (InternVL); the loss is sum(w*nll)/sum(w) over the global batch.
    loss_avg: Literal["token", "sample", "square"] = "token"


@dataclass(kw_only=True)
class PreferenceHeadConfig:
    """Options of the `dpo` and `mpo` heads (pairs: chosen then rejected sample of one row)."""

    beta: float = 0.1  # DPO/BCO temperature on the policy-reference log-ratio
    label_smoothing: float = 0.0  # cDPO: probability that a pair's labels are flipped (sigmoid only)
    # Loss terms, summed with `loss_weights`: sigmoid (DPO), ipo, bco_pair, sft (NLL on the chosen).
    # Empty = the head's preset: dpo -> [sigmoid]; mpo -> [sigmoid, bco_pair, sft].
    loss_types: list[Literal["sigmoid", "ipo", "bco_pair", "sft"]] = field(default_factory=list)
    loss_weights: list[float] = field(default_factory=list)  # one per loss type; empty = preset (mpo: 0.8, 0.2, 1.0)
    # Where reference log-probs come from: precomputed = the batch's ref_logprobs field
    # (`megatron-keye reference-logprobs`); model = a frozen reference model on the same layout.
    reference: Literal["precomputed", "model"] = "precomputed"
    reference_load: str | None = None  # checkpoint of the frozen reference; default checkpoint.load


@dataclass(kw_only=True)
class RewardHeadConfig:
    """Options of the `reward` head (Bradley-Terry on chosen/rejected pairs; model.output_head=value)."""

    margin: float = 0.0  # added to each pair's `pair_margin` (if the batch has one): -log σ(r_c - r_r - m)
    center_coefficient: float = 0.0  # η of the centering term η·(r_c + r_r)² per pair (TRL suggests 0.01)
    # Tokens with this id are padding: a sample's score is read at its last other token (HF's
    # "last non-pad token"); None = every token is real (the sample's last token).
    pad_token_id: int | None = None


@dataclass(kw_only=True)
class PolicyGradientHeadConfig:
    """Options of the `gspo` head (GSPO, GSPO-token, or GRPO for comparison) over RL rollouts."""

    # gspo: sequence ratio s_i = exp(mean_t log(pi/pi_old)), one clipped term per sample;
    # gspo_token: s_i,t = sg(s_i) pi/sg(pi) with per-token advantages; grpo: per-token ratio.
    variant: Literal["gspo", "gspo_token", "grpo"] = "gspo"
    clip_low: float = 3e-4  # epsilon_low: ratios below 1 - clip_low are clipped (GRPO: 0.2)
    clip_high: float = 4e-4  # epsilon_high: ratios above 1 + clip_high are clipped (GRPO: 0.27)
    log_ratio_max: float = 10.0  # clamp of the (mean) log-ratio before the exp (veRL)
    kl_coef: float = 0.0  # beta of the k3 KL to the reference (needs ref_logprobs); 0 = none
    # Aggregation of per-token terms: seq-mean-token-mean = mean over samples of each sample's
    # token mean (GSPO's); token-mean = mean over all response tokens of the global batch.
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"


@dataclass(kw_only=True)
class HeadConfig:
    """Per-head option sections; a head reads only its own (`heads/base.py`)."""

    sft: SFTHeadConfig = field(default_factory=SFTHeadConfig)
    preference: PreferenceHeadConfig = field(default_factory=PreferenceHeadConfig)
    reward: RewardHeadConfig = field(default_factory=RewardHeadConfig)
    gspo: PolicyGradientHeadConfig = field(default_factory=PolicyGradientHeadConfig)


@dataclass(kw_only=True)
class StageConfig:
    """What a training stage trains and with which loss head."""

    name: str = "pretrain"  # a label for the stage
    loss_head: str = "lm"  # registered loss head (heads/): lm, sft, dpo, mpo, ...
    head: HeadConfig = field(default_factory=HeadConfig)  # options of the loss heads
    # Parameters whose names match any of these fnmatch patterns are frozen.
    freeze: list[str] = field(default_factory=list)
    max_consecutive_nonfinite: int = 3  # stop after this many non-finite steps in a row


@dataclass(kw_only=True)
class RLConfig:
    """The RL loop of a `stage.loss_head: gspo` stage (`post_training/rl.py`): prompts -> G
    rollouts each from the current policy -> rewards -> progressive hints -> group advantages ->
    `minibatches` GSPO optimizer steps per rollout batch; `schedule.train_iters` counts those steps."""

    # JSONL of prompts: "prompt" (text), "answer" (reference), optional "mode" (think|no_think),
    # "hints" (L1..L5 list or mapping), "image"/"images", "video"/"videos" (relative to the file),
    # "source" (metrics label), tolerances "abs_tol"/"rel_tol".
    prompts: str | None = None
    prompts_per_rollout: int = 8  # prompts per rollout batch (all data-parallel ranks together)
    group_size: int = 8  # G rollouts per prompt (the group of the advantage normalization)
    minibatches: int = 4  # optimizer steps per rollout batch (GSPO paper: 4)
    max_new_tokens: int = 64  # response tokens per rollout at most
    temperature: float = 1.0  # sampling temperature; 1 so the kept log-probs are pi_old of the loss
    top_p: float = 1.0  # nucleus sampling mass
    seed: int = 0  # rollout seed: generation call k of rollout batch n samples from (seed, n, k)
    chat: bool = True  # render prompts with the chat template (assistant generation prompt)
    # Reward terms (post_training/rewards.py VERIFIERS: exact, numeric, numeric_close, choice,
    # format, json; 'model' = the score of rl.reward_model) and their weights; the reward is the
    # weighted sum.
    reward_terms: list[str] = field(default_factory=lambda: ["exact"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0])  # one per reward term
    # Native checkpoint of a reward model (model.output_head: value, same tokenizer) scoring
    # prompt + response for the 'model' reward term; served next to the policy on its layout.
    reward_model: str | None = None
    success_reward: float = 1.0  # a rollout whose reward reaches this counts as solved
    hints: bool = True  # retry prompts whose G rollouts all fail with hints L1..L5 (progressive)
    # Drop prompts whose trained group passed 0% or 100% of the time from the next epochs.
    filter_solved: bool = False
    std_floor: float = 1e-6  # added to the group std of the advantage normalization
    scale_advantages: bool = True  # (r - mean) / (std + floor); false = centred only (Dr. GRPO)
    shuffle: bool = True  # a seeded new prompt order every epoch


@dataclass(kw_only=True)
class TrainConfig:
    """The whole run."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # the RL loop of stage.loss_head=gspo
    precision: Literal["fp32", "bf16"] = "fp32"  # parameter and activation dtype (fp32 master weights under bf16)
    seed: int = 1234  # seed of weights (drawn per parameter name) and dropout
