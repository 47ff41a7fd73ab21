"""The `mmkit` command: look at the world, train recipes, count parameters, run benchmarks.

    mmkit world --n 16 --out grid.png        # a grid of Shapes World scenes with their captions
    mmkit train tokenizer-world --out DIR    # run a recipe (what mmkit.hub runs when a checkpoint is missing)
    mmkit params m6-base                     # parameter count per component (meta device: no memory used)
    mmkit bench precision                    # benchmarks print ratios measured side by side
    mmkit notebooks --execute                # run the notebooks in order and store their outputs
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path


MAX_WORLD_N = 1024              # scenes in one `mmkit world` grid (a dataset is mmkit.data.scenes / userdata's job)
MAX_WORLD_SIZE = 512           # pixels per scene (rendered 4x supersampled: 2048^2 per scene at the limit)
MAX_OBJECTS = 9                # one object per cell of the 3x3 grid


def _check_world_args(args: argparse.Namespace) -> None:
    """Refuse `mmkit world` arguments that would crash, run for hours or write somewhere odd, saying why."""
    if not 1 <= args.n <= MAX_WORLD_N:
        raise ValueError(f"--n {args.n}: give 1 to {MAX_WORLD_N} scenes (a grid of more is unreadable; for datasets "
                         "use mmkit.data.userdata.save_world_as_folder or mmkit.data.scenes.SceneBank)")
    if not 8 <= args.size <= MAX_WORLD_SIZE:
        raise ValueError(f"--size {args.size}: give 8 to {MAX_WORLD_SIZE} pixels (32 or 64 are typical)")
    if not 1 <= args.max_objects <= MAX_OBJECTS:
        raise ValueError(f"--max-objects {args.max_objects}: give 1 to {MAX_OBJECTS} (one object per grid cell)")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: the offset of the first scene inside the split is >= 0")
    if args.out:
        out = Path(args.out)
        if out.is_dir() or str(args.out).endswith(("/", "\\")):
            raise ValueError(f"--out {args.out} is a folder; give a file name, e.g. --out {out / 'grid.png'}")
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {args.out}: the grid is written as PNG; give a name ending in .png "
                             f"(e.g. {out.with_suffix('.png')})")


def _cmd_world(args: argparse.Namespace) -> int:
    from mmkit.data.text import captions
    from mmkit.data.world import render, sample_scene, split_seeds
    from mmkit.viz import save_grid

    _check_world_args(args)
    seeds = split_seeds(args.split, args.n, start=args.seed)
    t0 = time.perf_counter()
    scenes = [sample_scene(s, max_objects=args.max_objects) for s in seeds]
    images = [render(sc, size=args.size) for sc in scenes]
    dt = time.perf_counter() - t0
    texts = [captions(sc, lang=args.lang)[0] for sc in scenes]
    for s, t in zip(seeds, texts):
        print(f"scene {s}: {t}")
    print(f"rendered {len(scenes)} scenes at {args.size}px in {dt:.2f}s ({len(scenes) / max(dt, 1e-9):.0f} scenes/s)")
    if args.out:
        save_grid(images, args.out, captions=texts if args.captions else None)
        print(f"wrote {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import mmkit.zoo as zoo
    from mmkit.hub import cache_root

    if args.recipe and (args.recipe.endswith((".yaml", ".yml")) or Path(args.recipe).is_file()):
        return _train_run_config(args)
    if args.rest:
        raise ValueError(f"unexpected arguments {args.rest}: key=value overrides follow a run config "
                         "(mmkit train RUN.yaml train.steps=10), not a recipe name")
    if args.list or not args.recipe:
        for name in zoo.recipe_names():
            print(f"{name:<28} {zoo.get_recipe(name).description}")
        print("\nrun tasks (mmkit train RUN.yaml; scaled/configs/runs/):")
        for name in zoo.registry.run_task_names():
            print(f"{name:<28} {zoo.registry.run_task(name).description}")
        return 0
    out = Path(args.out) if args.out else cache_root() / (f"{args.recipe}@fast" if args.fast else args.recipe)
    metrics = zoo.run_recipe(args.recipe, out, fast=args.fast, overwrite=args.overwrite)
    print(f"wrote {out}")
    for k, v in metrics.items():
        print(f"  {k}: {v}")
    return 0


def _train_run_config(args: argparse.Namespace) -> int:
    """`mmkit train RUN.yaml [key=value ...]`: a run config (mmkit.runs) under whatever launcher started this process."""
    import mmkit.hub as hub
    import mmkit.zoo as zoo
    from mmkit.runs import describe_run, load_run_config, run, world_info
    from mmkit.train import end_training

    cfg = load_run_config(args.recipe, args.rest)
    if args.out:
        cfg.out_dir = str(Path(args.out).resolve())
    if args.dry_run:
        print(describe_run(cfg))
        return 0
    init_dir = None
    if cfg.init_from is not None:
        p = Path(cfg.init_from)
        if p.exists():
            init_dir = p
        elif "/" not in cfg.init_from and cfg.init_from in zoo.recipe_names():
            init_dir = hub.checkpoint_dir(cfg.init_from)          # a hub name: shipped / cached / trained once
        else:
            raise ValueError(f"init_from {cfg.init_from!r} is neither a folder nor a checkpoint name; run the previous "
                             "stage first (its out_dir), or name a checkpoint (mmkit train --list)")
    result = run(cfg, load=zoo.load, init_dir=init_dir)
    rank, _ = world_info()
    if rank == 0:
        r = result.result
        last = r.history[-1] if r is not None and r.history else {}
        print(f"trained {cfg.task} ({result.parameters:,} parameters on this process, {result.strategy}, "
              f"{result.world_size} process(es)): step {last.get('step')}, loss {last.get('loss')}")
        if r is not None and r.checkpoint:
            print(f"checkpoint {r.checkpoint}")
    if result.world_size > 1:
        # every rank is done and the checkpoint is on disk: leave without gloo's teardown, which sometimes aborts
        # at interpreter exit ("terminate called without an active exception", ENVIRONMENT.md) and would make a
        # finished run look failed to torchrun / SLURM
        import torch.distributed as dist

        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    end_training()
    return 0


def _paper_table() -> int:
    """Every full-size config's parameter count against the paper's (what each paper counts: see scaled/README.md)."""
    from mmkit.scale import PAPER_PARAMS
    from mmkit.zoo import build_model

    print(f"{'config':<13}{'counted':>17}{'paper':>9}{'diff':>8}  source: what is counted")
    for name, (paper, source, what) in PAPER_PARAMS.items():
        model = build_model(name, device="meta")
        if hasattr(model, "num_backbone_parameters"):
            n = model.num_backbone_parameters()
        elif hasattr(model, "parameter_counts"):
            n = model.parameter_counts()["online"]
        else:
            n = sum(p.numel() for p in model.parameters())
        print(f"{name:<13}{n:>17,}{paper / 1e6:>8.0f}M{100 * (n / paper - 1):>+7.1f}%  {source}: {what}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from mmkit.params import count_parameters, format_counts
    from mmkit.zoo import build_model, load_config

    if args.config is None:
        return _paper_table()
    cfg = load_config(args.config)
    model = build_model(cfg, device="meta")
    print(format_counts(count_parameters(model), title=f"{args.config} ({type(cfg).__name__})"))
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from mmkit.zoo import available_configs

    for name in available_configs():
        print(name)
    return 0


def _bench_names() -> list[str]:
    import mmkit.bench as bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _cmd_bench(args: argparse.Namespace) -> int:
    names = _bench_names()
    if args.list or not args.name:
        print("benchmarks:", ", ".join(names))
        return 0
    if args.name not in names:
        print(f"mmkit bench: unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    importlib.import_module(f"mmkit.bench.{args.name}").run(args.rest)
    return 0


def _cmd_notebooks(args: argparse.Namespace) -> int:
    from mmkit.notebooks import main as notebooks_main

    return notebooks_main(args.rest)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from mmkit.tokenizer import decode, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok(args.text)["input_ids"]
    print("tokens:", tok.convert_ids_to_tokens(ids))
    print("ids:   ", ids)
    print("decoded:", decode(tok, ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("world", help="render Shapes World scenes (and their captions) to a PNG grid")
    w.add_argument("--n", type=int, default=16, help=f"number of scenes, 1..{MAX_WORLD_N} (default 16)")
    w.add_argument("--size", type=int, default=64,
                   help=f"image size in pixels, 8..{MAX_WORLD_SIZE} (default 64; 32 for fast runs)")
    w.add_argument("--seed", type=int, default=0, help="offset of the first scene inside the split (default 0)")
    w.add_argument("--split", default="train", choices=["train", "val", "test"], help="which fixed split (default train)")
    w.add_argument("--max-objects", type=int, default=3, help="objects per scene, 1..N (default 3)")
    w.add_argument("--lang", default="en", choices=["en", "zh"], help="caption language (default en)")
    w.add_argument("--captions", action="store_true", help="print each scene's caption under it in the PNG")
    w.add_argument("--out", help="PNG file to write the grid to (a .png file name, not a folder)")
    w.set_defaults(fn=_cmd_world)

    t = sub.add_parser("train", help="run a recipe into a checkpoint folder (list them with --list)")
    t.add_argument("recipe", nargs="?", help="recipe name, e.g. tokenizer-world, or a run config "
                   "(scaled/configs/runs/*.yaml) followed by key=value overrides")
    t.add_argument("rest", nargs="*", help="run config overrides, e.g. train.steps=10 out_dir=/tmp/run")
    t.add_argument("--dry-run", action="store_true", help="run config: print what it would train, train nothing")
    t.add_argument("--out", help="output folder (default: the hub cache, $MMKIT_CACHE or ~/.cache/mmkit)")
    t.add_argument("--fast", action="store_true", help="the recipe's short path (what CI uses)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t.add_argument("--list", action="store_true", help="list the recipes")
    t.set_defaults(fn=_cmd_train)

    pa = sub.add_parser("params", help="parameter count per component for a config (preset name or YAML file)")
    pa.add_argument("config", nargs="?", help="preset name (see `mmkit configs`) or a YAML file, e.g. "
                    "scaled/configs/m6_base.yaml; without it: every full-size config against its paper")
    pa.set_defaults(fn=_cmd_params)

    c = sub.add_parser("configs", help="list the named config presets")
    c.set_defaults(fn=_cmd_configs)

    b = sub.add_parser("bench", help="run a benchmark (ratios measured side by side); --list shows them")
    b.add_argument("name", nargs="?", help="benchmark name")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (try --help)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.set_defaults(fn=_cmd_bench)

    n = sub.add_parser("notebooks", help="execute the notebooks and store their outputs, or check them (try --help)",
                       add_help=False)
    n.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m mmkit.notebooks")
    n.set_defaults(fn=_cmd_notebooks)

    k = sub.add_parser("tokenize", help="show how a tokenizer splits a text")
    k.add_argument("text")
    k.add_argument("--tokenizer", default="world", help="'world' or a local Hugging Face tokenizer folder")
    k.set_defaults(fn=_cmd_tokenize)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["notebooks"]:                     # its own options (--help included) go to mmkit.notebooks
        return _cmd_notebooks(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmkit {args.command}: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        hub = sys.modules.get("mmkit.hub")      # raised only once the hub is imported; --help stays light
        if hub is None or not isinstance(e, hub.CheckpointError):
            raise
        print(f"mmkit {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:                       # missing / unwritable files and folders, full disks
        print(f"mmkit {args.command}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
