"""Command line: ``python -m lora_helpers course|train|serve|plan|bench|sweep|links|images|tiny|presets`` (also ``lora-course``)."""

from __future__ import annotations

import argparse
import sys

# bench.MODELS, written out so that parsing the command line does not import torch (tests/test_bench.py checks)
BENCH_MODELS = ["tiny", "mid", "smollm2-135m", "llama-2-7b", "llama-3.2-3b", "llama-3.1-8b"]


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (``python -m lora_helpers COMMAND --help``)."""
    parser = argparse.ArgumentParser(prog="python -m lora_helpers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    course = commands.add_parser("course", help="run the notebooks in order with papermill")
    course.add_argument("--preset", default="tiny", help="a preset name (default: tiny, offline on CPU)")
    course.add_argument("--run-dir", default=None, help="where results go (default: runs/PRESET)")
    course.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in run-dir")
    course.add_argument("--only", nargs="+", default=None, metavar="NN", help="run only these notebooks, e.g. 04 05")
    course.add_argument(
        "--rehearse-t4",
        action="store_true",
        help="on a bigger GPU, run as on a Colab T4: 14.3 GiB for PyTorch, fp16, SDPA (checks a class before teaching)",
    )
    course.add_argument(
        "--random-weights",
        action="store_true",
        help="replace the preset's model by random weights of its exact shapes and family tokenizer (no download)",
    )
    course.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a notebook parameter, e.g. -p lora_r=4 (repeatable)",
    )

    trainer = commands.add_parser(
        "train", help="notebook 04's training as a command, on one process or under torchrun / accelerate launch"
    )
    trainer.add_argument("--preset", default="tiny")
    trainer.add_argument("--run-dir", default=None, help="where results go (default: runs/PRESET)")
    trainer.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in run-dir")
    trainer.add_argument(
        "--processes", type=int, default=None, help="how many processes the launcher should have started (checked)"
    )
    trainer.add_argument(
        "--rehearse-t4", action="store_true", help="on bigger GPUs, every process behaves like a Colab T4 (notebook 01)"
    )
    trainer.add_argument(
        "-p", "--parameter", action="append", default=[], metavar="NAME=VALUE", help="a setting, e.g. -p lora_r=8"
    )

    server = commands.add_parser(
        "serve", help="an OpenAI-compatible server (llama.cpp) for the run's adapters over one base model"
    )
    server.add_argument("--run-dir", required=True, help="a trained run (notebook 04 wrote its adapter)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) answers this machine only")
    server.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve another adapter folder of the same base model under NAME (repeatable)",
    )

    planner = commands.add_parser("plan", help="trainable parameters and estimated peak memory, before loading")
    planner.add_argument("--preset", default="tiny")
    planner.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting, e.g. -p lora_r=16 -p max_length=2048",
    )
    planner.add_argument("--json", action="store_true", help="print the plan as JSON")

    bench = commands.add_parser(
        "bench", help="the course's training recipe against the Llama-2 about-me recipe's, as ratios"
    )
    bench.add_argument(
        "--model",
        choices=BENCH_MODELS,
        default="tiny",
        help="tiny, mid and the real smollm2-135m run on a CPU; the Llama ones are random-weight models with those "
        "exact shapes (GPU only)",
    )
    bench.add_argument("--preset", default=None, help="the settings to measure (default: tiny, or the shape's preset)")
    bench.add_argument("--steps", type=int, default=20, help="timed optimizer steps, after 3 untimed ones")
    bench.add_argument("--batch-size", type=int, default=None)
    bench.add_argument("--max-length", type=int, default=None)
    bench.add_argument(
        "--dataset", default=None, help="another data shape, e.g. package:guanaco_llama2_sample.jsonl (mixed lengths)"
    )
    bench.add_argument("--repeats", type=int, default=3, help="runs of baseline and course each, interleaved")
    bench.add_argument("--out", default="runs/bench", help="where bench.json and bench.md go")

    sweep = commands.add_parser(
        "sweep", help="every recipe on one loaded model, one JSON line per run (the GPU script, .ci/gpu-bench)"
    )
    sweep.add_argument(
        "--model",
        choices=BENCH_MODELS,
        default="tiny",
    )
    sweep.add_argument("--preset", default=None, help="the settings (default: tiny, or the model's preset)")
    sweep.add_argument("--shapes", default="mixed,short,full", help="data shapes in order; the first is repeated")
    sweep.add_argument("--repeats", type=int, default=2, help="interleaved runs of the first shape's recipes")
    sweep.add_argument("--examples", type=int, default=24, help="examples per epoch (two epochs, the second timed)")
    sweep.add_argument("--max-length", type=int, default=None)
    sweep.add_argument("--budget-s", type=float, default=480, help="skip runs that would end past this many seconds")
    sweep.add_argument("--no-liger", action="store_true", help="skip Liger's variants on a CUDA GPU")
    sweep.add_argument("--out", default="runs/sweep", help="where sweep.jsonl and sweep.md go")

    commands.add_parser("links", help="rewrite the notebooks' Colab cell and links from links.REPOSITORY")

    images = commands.add_parser("images", help="redraw the diagrams in images/")
    images.add_argument("--out", default="images")

    commands.add_parser("tiny", help="build (or find) the tiny model and print its directory")
    commands.add_parser("presets", help="list the presets")

    return parser


def course(args) -> int:
    """Run the notebooks in order (the README's "Run the course")."""
    from lora_helpers import course as runner

    try:
        params = runner.parse_parameters(args.parameter)
        summary = runner.run_course(
            args.preset,
            args.run_dir,
            args.only,
            params,
            overwrite=args.overwrite,
            rehearse_t4=args.rehearse_t4,
            random_weights=args.random_weights,
        )
    except runner.CourseInterrupted as error:
        print(f"\ninterrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # between notebooks, or while the random-weight model is built
        print("\ninterrupted.", file=sys.stderr)
        return 130
    except (runner.NotebookFailed, ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    runner.print_summary(summary)
    return 0


def train(args) -> int:
    """Notebook 04's training as a command, once per process under a launcher (notebook 07)."""
    from lora_helpers import course as runner
    from lora_helpers import launch, process

    try:
        log = launch.train(
            args.preset,
            args.run_dir,
            runner.parse_parameters(args.parameter),
            args.overwrite,
            args.processes,
            args.rehearse_t4,
        )
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    if process.world()[0] == 0:
        print(
            f"trained on {log['world_size']} process(es), effective batch {log['effective_batch']}: "
            f"train loss {log['first_train_loss']:.3f} -> {log['final_train_loss']:.3f}"
        )
    return 0


def serve(args) -> int:
    """The run's adapters behind an OpenAI-compatible API, until Ctrl-C (notebook 06, "Serve the adapters")."""
    from lora_helpers import serving

    try:
        extra = serving.parse_adapter_options(args.adapter)
        serving.serve(args.run_dir, args.host, args.port, extra)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    return 0


def plan(args) -> int:
    import json

    from lora_helpers import course as runner
    from lora_helpers import plan as planner

    result = planner.plan_for_preset(args.preset, **runner.parse_parameters(args.parameter))
    print(json.dumps(result, indent=2) if args.json else planner.format_plan(result))
    return 0


def bench(args) -> int:
    from lora_helpers import bench as benchmark

    result = benchmark.benchmark(
        args.model, args.preset, args.steps, args.batch_size, args.max_length, args.repeats, args.dataset
    )
    for path in benchmark.write_results(result, args.out):
        print("wrote", path)
    print(benchmark.markdown_table(result))
    return 0


def sweep(args) -> int:
    from lora_helpers import sweep as runs

    lines = runs.sweep(
        args.out,
        args.model,
        args.preset,
        tuple(args.shapes.split(",")),
        args.repeats,
        args.examples,
        args.max_length,
        args.budget_s,
        liger=False if args.no_liger else None,
    )
    print("wrote", lines, "and", lines.with_name("sweep.md"))
    print(lines.with_name("sweep.md").read_text())
    return 0


def links(args) -> int:
    from lora_helpers import links as writer

    for path in writer.write_links():
        print("rewrote", path)
    return 0


def images(args) -> int:
    from lora_helpers import plots

    for path in plots.draw_course_images(args.out):
        print(path)
    return 0


def tiny(args) -> int:
    from lora_helpers import tiny as builder

    print(builder.tiny_model_dir())
    return 0


def presets(args) -> int:
    from lora_helpers import presets as recipes

    for name, settings in recipes.PRESETS.items():
        print(f"{name:<20} {settings.model_id:<36} {settings.description}")
    return 0


COMMANDS = {
    "course": course,
    "train": train,
    "serve": serve,
    "plan": plan,
    "bench": bench,
    "sweep": sweep,
    "links": links,
    "images": images,
    "tiny": tiny,
    "presets": presets,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
