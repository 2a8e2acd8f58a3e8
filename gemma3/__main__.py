"""Command line: ``python -m gemma3 generate|chat|info|inspect ...``."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file or HF checkpoint directory "
                   "(default: the embedded Gemma 3 270M)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--adapter", action="append", default=None, metavar="PATH",
                   help="LoRA adapter (PEFT directory or llama.cpp LoRA GGUF); repeatable")


def _gen_kwargs(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=a.stop)


def _load(a):
    import gemma3

    kw = {"mmproj": a.mmproj} if getattr(a, "mmproj", None) else {}
    if getattr(a, "adapter", None):
        kw["adapter"] = a.adapter
    return gemma3.load(a.model, n_threads=a.threads, max_seq_len=a.max_seq_len, **kw)


def cmd_generate(a) -> int:
    model = _load(a)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    images = a.image or []
    if a.chat:
        content = ([{"type": "image", "image": f} for f in images]
                   + [{"type": "text", "text": prompt}]) if images else prompt
        pieces = model.chat([{"role": "user", "content": content}], stream=True,
                            pan_and_scan=a.pan_and_scan, **_gen_kwargs(a))
    else:
        if images and "<start_of_image>" not in prompt:  # the pictures go first
            prompt = "<start_of_image>" * len(images) + prompt
        if not a.no_echo:
            sys.stdout.write(prompt)
        pieces = model.stream(prompt, images=images or None, pan_and_scan=a.pan_and_scan,
                              **_gen_kwargs(a))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a) -> int:
    model = _load(a)
    messages = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("Chat with the model; an empty line or Ctrl-D ends, Ctrl-C stops a reply.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.chat(messages, stream=True, **_gen_kwargs(a)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(a) -> int:
    import gemma3

    path = a.model or gemma3.default_model_path()
    print(gemma3.GGUFFile(path).summary())
    return 0


def cmd_inspect(a) -> int:
    model = _load(a)
    cfg = model.config
    if not 0 <= a.layer < cfg.num_layers:
        raise ValueError(f"--layer {a.layer} out of range (the model has {cfg.num_layers})")
    if not 0 <= a.head < cfg.num_heads:
        raise ValueError(f"--head {a.head} out of range (the model has {cfg.num_heads} heads)")
    ids = model.encode(a.text)
    name = f"blocks.{a.layer}.attn.hook_pattern"
    _, cache = model.run_with_cache(ids, names=[name], heads=[a.head], logits="none")
    p = cache[name][0]  # (T, T)
    local = cfg.layer_types[a.layer] == "sliding_attention" and cfg.sliding_window > 0
    window = cfg.sliding_window if local else None
    from . import plot

    toks = plot.token_strings(model, ids)
    kind = f"local, window {window}" if local else "global"
    print(f"layer {a.layer} ({kind}), head {a.head}: {len(ids)} tokens; top attended keys "
          f"per query")
    k = max(1, a.top)
    for i in range(len(ids)):
        best = np.argsort(-p[i, :i + 1], kind="stable")[:k]
        keys = ", ".join(f"{j} {toks[j]!r} {p[i, j]:.2f}" for j in best)
        print(f"  {i:4d} {toks[i]!r:>16}  ->  {keys}")
    if a.out:
        try:
            fig = plot.attention_heatmap(p, toks, layer=a.layer, head=a.head, window=window)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        fig.savefig(a.out, dpi=120)
        print(f"wrote {a.out}")
    if a.html:
        page = plot.attention_html(p, toks, title=f"layer {a.layer} head {a.head} ({kind})")
        with open(a.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"wrote {a.html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gemma3",
                                 description="Run and study Gemma 3 on the CPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="continue a prompt (streams the text)")
    g.add_argument("prompt", nargs="?", help="prompt text (default: stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat turn")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="picture for a <start_of_image> in the prompt (repeatable; prepended "
                   "when the prompt has none); needs a vision model")
    g.add_argument("--pan-and-scan", action="store_true",
                   help="add crops of wide or tall pictures (Gemma 3 pan & scan)")
    g.add_argument("--mmproj", default=None, help="llama.cpp vision GGUF for a text GGUF model")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("info", help="print a GGUF file's metadata summary")
    i.add_argument("--model", "-m", default=None)
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("inspect", help="attention pattern of one layer/head: heatmap, summary")
    s.add_argument("text", help="prompt text (tokenized with BOS)")
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--head", type=int, default=0)
    s.add_argument("--out", default=None, help="save the heatmap here (PNG, needs matplotlib)")
    s.add_argument("--html", default=None, help="also write a standalone HTML attention view")
    s.add_argument("--top", type=int, default=3, help="keys listed per query (default 3)")
    s.add_argument("--model", "-m", default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--max-seq-len", type=int, default=None)
    s.set_defaults(func=cmd_inspect)
    from . import eval as _eval

    e = sub.add_parser("eval", help="run an evaluation task file (JSON Lines; see gemma3.eval)")
    _eval.add_arguments(e)
    e.set_defaults(func=_eval.run_cli)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
