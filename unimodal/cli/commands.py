"""The non-Lightning subcommands: sample, evaluate, caption, compare, demo (argparse; user errors -> one line)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"unimodal {prog}", description=description)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _sampling_args(p: argparse.ArgumentParser):
    from unimodal.tokenizers.image import DECODERS

    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely allowed ids (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per generate() call")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cache", choices=["dynamic", "static"], default="static",
                   help="the library's KV cache: static (preallocated) or dynamic (grows per step)")  # fmt: skip
    p.add_argument(
        "--compile",
        action="store_true",
        help="the fast path: an own image-decoding loop on a static cache, compiled once (needs --cache static; "
        "the first call compiles, for seconds to minutes on a CPU; the same images as without it)",
    )
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        default="auto",
        help="codes -> pixels: the bundle's diffusion decoder if it has one (auto), or the VQ decoder",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _params(args, images_per_prompt: int = 1):
    from unimodal.generation.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        seed=args.seed, images_per_prompt=images_per_prompt, batch_size=args.batch_size,
        cfg_scale=args.cfg_scale, cache=args.cache, compile=args.compile, decoder=args.decoder,
    )  # fmt: skip


def sample_main(argv: list[str]) -> int:
    p = make_parser("sample", "Generate images from text prompts with a trained bundle; writes a labelled PNG grid.")
    p.add_argument("--bundle", required=True, help="bundle folder (a transformer run's export/)")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--num-images", type=_positive_int, default=4, help="images per prompt (default 4)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write (default grid.png)")
    p.add_argument("--out-dir", default=None, help="also write each image as a PNG into this folder")
    p.add_argument("--rerank", type=_positive_int, default=None,
                   help="generate this many candidates per prompt and keep the --num-images best by a "
                        "contrastive scorer (trained once on the bundle's training pairs, cached in "
                        "BUNDLE/reranker)")  # fmt: skip
    _sampling_args(p)
    args = p.parse_args(argv)
    from unimodal.data.images import tensor_to_image
    from unimodal.generation.bundle import Bundle
    from unimodal.viz import make_grid

    candidates = args.rerank or args.num_images
    if candidates < args.num_images:
        raise ValueError(f"--rerank {candidates} is fewer than --num-images {args.num_images}; raise --rerank")
    params = _params(args, candidates)
    bundle = Bundle.load(args.bundle, device=args.device)
    prompts = [q.strip() for q in args.prompt]
    if any(not q for q in prompts):
        raise ValueError("empty --prompt; give a caption such as 'a red circle at the top left'")
    if args.compile:
        print("--compile: the first batch compiles the forward (seconds to minutes on a CPU; the images/s "
              "below include it)", file=sys.stderr)  # fmt: skip
    if args.compile and args.device == "cpu":
        from unimodal.generation.fast.host import keep_freed_memory

        keep_freed_memory()  # this process only samples: freed temporaries are reused, not page-faulted in
    start = time.perf_counter()
    images = bundle.generate(prompts, params)
    if args.rerank:
        from unimodal.generation.rerank import rerank, reranker_for

        scorer = reranker_for(bundle, Path(args.bundle) / "reranker")
        images, _ = rerank(scorer, images, bundle.text_tokenizer.encode_batch(prompts), candidates, args.num_images)
    seconds = time.perf_counter() - start
    labels = [q for q in prompts for _ in range(args.num_images)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, labels, ncol=max(args.num_images, 2)).save(args.out)
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            tensor_to_image(img).save(out_dir / f"{i // args.num_images:03d}_{i % args.num_images:02d}.png")
    print(f"wrote {len(images)} images ({len(images) / seconds:.1f} images/s) -> {args.out}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = make_parser(
        "evaluate",
        "Score a bundle on the data it was trained on (recorded in the bundle) or --data. Real data: Fréchet "
        "distance and KID, prompt agreement (R@1/R@5), attribute accuracy and tokenizer PSNR/SSIM/usage, each "
        "beside its ceiling and floor, in a feature space trained on the real training pairs. The built-in "
        "shapes: judged caption fidelity.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--data", default=None, help="data to score on (default: the bundle's own; other data is refused)")
    p.add_argument("--split", default="test", help="split to score (shapes: test or heldout; default test)")
    p.add_argument("--num-captions", type=_positive_int, default=200, help="captions to generate for")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first 32 generated images")
    p.add_argument("--judge-dir", default=None, help="shapes: judge cache (default: BUNDLE/judge)")
    p.add_argument(
        "--feature-dir",
        default=None,
        help="real data: cache of the evaluation features network (default: BUNDLE/eval_features)",
    )
    p.add_argument(
        "--rerank",
        type=_positive_int,
        default=1,
        help="candidates per caption; a contrastive scorer (trained once on the bundle's training pairs, cached "
        "in BUNDLE/reranker) keeps the best, and the scores without it are reported beside (1 = off)",
    )
    _sampling_args(p)
    args = p.parse_args(argv)
    from unimodal.evaluation.evaluate import write_json
    from unimodal.evaluation.realdata import data_of, evaluate_real
    from unimodal.generation.bundle import Bundle

    params = _params(args)
    bundle = Bundle.load(args.bundle, device=args.device)
    if bundle.data is None and args.data is None:
        source = None  # a bundle that records no data: the built-in shapes, as before bundles recorded it
        print("note: this bundle does not record its training data; scoring it on the built-in shapes")
    else:
        source = data_of(bundle, args.data)
    if source is None or source.name == "shapes":
        from unimodal.evaluation.evaluate import SPLITS, evaluate_bundle

        if args.split not in SPLITS:
            raise ValueError(f"the shapes evaluation scores the splits {list(SPLITS)}, not {args.split!r}")
        result = evaluate_bundle(
            bundle, args.split, args.judge_dir or Path(args.bundle) / "judge", args.num_captions, params,
            shapes=source.shapes if source else None, grid_path=args.grid, rerank=args.rerank,
            reranker_dir=Path(args.bundle) / "reranker",
        )  # fmt: skip
    else:
        result = evaluate_real(bundle, source, args.split, args.feature_dir or Path(args.bundle) / "eval_features",
                               args.num_captions, params, grid_path=args.grid, rerank=args.rerank,
                               reranker_dir=Path(args.bundle) / "reranker")  # fmt: skip
    if args.json:
        write_json(result, args.json)
    print(json.dumps(result, indent=2))
    return 0


def caption_main(argv: list[str]) -> int:
    p = make_parser("caption", "Image -> text with a bundle trained on both orders (data.i2t_fraction > 0).")
    p.add_argument("--bundle", required=True, help="bundle folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="image files to caption")
    what.add_argument("--split", choices=["test", "heldout"], help="caption a shapes split and score the captions")
    p.add_argument("--num-images", type=_positive_int, default=200, help="images of --split to caption")
    p.add_argument("--out", default=None, help="write captions here (JSON lines: file, caption)")
    p.add_argument("--json", default=None, help="with --split: write the accuracy results here")
    _sampling_args(p)
    args = p.parse_args(argv)
    from unimodal.data.images import images_to_tensor
    from unimodal.evaluation.captioning import captioning_accuracy
    from unimodal.evaluation.evaluate import write_json
    from unimodal.generation.bundle import Bundle
    from unimodal.generation.caption import caption_images

    params = _params(args)
    bundle = Bundle.load(args.bundle, device=args.device)
    if args.split:
        result = captioning_accuracy(bundle, args.split, args.num_images, params)
        if args.json:
            write_json(result, args.json)
        print(json.dumps(result, indent=2))
        return 0
    from PIL import Image

    missing = [f for f in args.images if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    pixels = images_to_tensor([Image.open(f) for f in args.images], bundle.image_tokenizer.config.resolution)
    captions = caption_images(bundle, pixels, params)
    lines = [json.dumps({"file": f, "caption": c}) for f, c in zip(args.images, captions)]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def compare_main(argv: list[str]) -> int:
    p = make_parser("compare", "Compare fit runs from their CSV logs: markdown table + validation curves PNG.")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", required=True, help="output folder for compare.md and curves.png")
    p.add_argument("--sort-by", default=None, help="metric to rank the runs by (e.g. val/loss_image); best in bold")
    p.add_argument("--descending", action="store_true", help="higher --sort-by is better (e.g. caption fidelity)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="keep only metrics containing one of these substrings (e.g. loss_image fidelity)")  # fmt: skip
    args = p.parse_args(argv)
    from unimodal.evaluation.compare import compare

    table, plot = compare(args.runs, args.out, args.sort_by, args.descending, metrics=args.metrics)
    print(table.read_text())
    print(f"table -> {table}\nplot  -> {plot}")
    return 0


def sweep_main(argv: list[str]) -> int:
    from unimodal.cli.sweep import SWEEP_FILE, run_sweep

    p = make_parser("sweep", f"Run an experiment family (a folder with {SWEEP_FILE} and one YAML diff per run), "
                             "skipping finished runs, then compare the runs (table sorted by the family's metric "
                             "+ curves). See unimodal/cli/sweep.py for the folder layout.")  # fmt: skip
    p.add_argument("family", help="family folder, e.g. experiments/heldout")
    p.add_argument("--root", default="runs", help="runs go to ROOT/FAMILY/<run> (default runs)")
    p.add_argument("--only", nargs="+", default=None, help="run only these runs of the family")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent `unimodal ... fit` commands and stop")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--stage1-args", default="", help="extra arguments for every tokenizer fit, one quoted string")
    p.add_argument("--stage2-args", default="",
                   help="extra arguments for every transformer fit, e.g. '--trainer.max_steps 200'")  # fmt: skip
    p.add_argument("--out", default=None, help="comparison folder (default ROOT/FAMILY/compare)")
    args = p.parse_args(argv)
    try:
        run_sweep(args.family, args.root, args.only, args.force, args.dry_run, args.wandb, args.stage1_args,
                  args.stage2_args, args.out)  # fmt: skip
    except RuntimeError as err:  # some runs failed; the others finished and were compared
        print(f"unimodal sweep: error: {err}", file=sys.stderr)
        return 1
    return 0


def reconstruct_main(argv: list[str]) -> int:
    p = make_parser("reconstruct", "Image files through the tokenizer: originals above, reconstructions below.")
    p.add_argument("--tokenizer", required=True, help="image tokenizer folder (a tokenizer run's export/)")
    p.add_argument("--images", nargs="+", required=True, help="image files (any size/mode; resized, centre-cropped)")
    p.add_argument("--out", default="reconstructions.png", help="PNG grid to write (default reconstructions.png)")
    args = p.parse_args(argv)
    from unimodal.evaluation.reconstruct import reconstruction_grid

    result = reconstruction_grid(args.tokenizer, args.images, args.out)
    print(f"{result['images']} images: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f} -> {args.out}")
    return 0


def extract_main(argv: list[str]) -> int:
    p = make_parser(
        "extract",
        "Encode a dataset's images once with a trained image tokenizer into Parquet shards (codes + caption) "
        "that stage 2 reads with --data.codes OUT (and streams with --data.streaming true).",
    )
    p.add_argument("--tokenizer", required=True, help="trained image tokenizer folder (stage 1's export)")
    p.add_argument("--data", required=True, help="data source: a folder, a .csv/.parquet/.jsonl table, or 'shapes'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="splits to extract (default: train test)")
    p.add_argument("--flip", action="store_true", help="also store every view mirrored left-right (a second row)")
    p.add_argument("--crops", type=int, choices=[1, 5], default=1,
                   help="views per image: 1 (the whole image) or 5 (also the four corner crops of it enlarged "
                   "--crop-scale times; with --flip, LlamaGen's ten crops)")  # fmt: skip
    p.add_argument("--crop-scale", type=float, default=1.1, help="enlargement before the corner crops (default 1.1)")
    p.add_argument("--background", default="white", help="colour under transparent pixels (default: white)")
    p.add_argument("--rows-per-shard", type=_positive_int, default=100_000)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per tokenizer call")
    args = p.parse_args(argv)
    from unimodal.data.codes import extract_codes
    from unimodal.data.pairs import DataSource
    from unimodal.tokenizers.image import ImageTokenizer

    tokenizer = ImageTokenizer.from_pretrained(args.tokenizer).eval()
    source = DataSource(name=args.data, background=args.background)
    info = extract_codes(tokenizer, args.tokenizer, source, args.out, tuple(args.splits), args.flip,
                         args.rows_per_shard, args.batch_size, args.crops, args.crop_scale)  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


def attach_main(argv: list[str]) -> int:
    p = make_parser(
        "decoder attach",
        "Put the diffusion decoder of a `unimodal decoder fit` export into a trained bundle with the same image "
        "tokenizer; `sample` and `evaluate` then decode with it (their --decoder vq keeps the VQ decoder).",
    )
    p.add_argument("--bundle", required=True, help="trained bundle folder")
    p.add_argument("--tokenizer", required=True, help="export of `unimodal decoder fit` (tokenizer + pixel_decoder/)")
    args = p.parse_args(argv)
    from unimodal.training.decoder import attach

    print(f"diffusion decoder -> {attach(args.bundle, args.tokenizer)}")
    return 0


def decoder_compare_main(argv: list[str]) -> int:
    p = make_parser(
        "decoder compare",
        "The VQ decoder and the diffusion decoder of a `unimodal decoder fit` export on the same codes of real "
        "images: PSNR, SSIM, Fréchet distance in the data's evaluation features, ms per image, per sampling steps.",
    )
    p.add_argument("--tokenizer", required=True, help="export of `unimodal decoder fit` (or a bundle with a decoder)")
    p.add_argument("--data", default="shapes", help="data source the images come from (default: the built-in shapes)")
    p.add_argument("--split", default="test", help="split to decode (default test)")
    p.add_argument("--num-images", type=_positive_int, default=500, help="images to decode (default 500)")
    p.add_argument("--steps", type=_positive_int, nargs="+", default=[5, 10, 20, 50],
                   help="sampling steps of the diffusion decoder to compare (default 5 10 20 50)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--cache-dir", default=None, help="where the evaluation network is cached (default: TOKENIZER/eval)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--grid", default=None, help="write a PNG of originals and each decoder's images")
    args = p.parse_args(argv)
    from unimodal.data.pairs import DataSource
    from unimodal.evaluation.decoders import compare_decoders, feature_fn, format_table, real_images
    from unimodal.evaluation.evaluate import write_json
    from unimodal.tokenizers.image import ImageTokenizer
    from unimodal.training.decoder import tokenizer_folder

    folder = tokenizer_folder(args.tokenizer)
    tokenizer = ImageTokenizer.from_pretrained(folder)
    r = tokenizer.config.resolution
    source = DataSource(name=args.data)
    images = real_images(source, args.split, r, args.num_images)
    reference = real_images(source, "train", r, images.shape[0])
    features = feature_fn(source, r, args.cache_dir or folder / "eval")
    result = compare_decoders(tokenizer, images, features, reference, tuple(args.steps), args.batch_size,
                              grid_path=args.grid)  # fmt: skip
    result.update({"tokenizer": str(folder), "data": args.data, "split": args.split})
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def demo_main(argv: list[str]) -> int:
    from unimodal.cli.demo import run_demo

    p = make_parser("demo", "Train both stages on the built-in shapes, sample, evaluate and compare, in one go.")
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--quick", action="store_true", help="a tiny run (a minute) to check the set-up")
    args = p.parse_args(argv)
    run_demo(Path(args.out), wandb=args.wandb, quick=args.quick)
    return 0
