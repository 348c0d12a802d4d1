"""Chapter 6 bonus: the three kinds of classifier on the same labelled text, in one table.

    python -m ch06.imdb --quick                        # IMDb splits; small random GPT and a tiny random BERT
    python -m ch06.imdb --encoder bert-base-uncased    # pretrained GPT-2 124M, BERT and the baseline
    python -m ch06.imdb --data reviews.jsonl --text-column review --label-column stars --quick

The book's README compares GPT-2, BERT, DistilBERT, RoBERTa and logistic regression on IMDb, each run
as its own script. `compare` runs our three (`train_gpt`, `train_bert_hf` for every `--encoder`,
`train_sklearn_logreg`) on the same splits and prints `report.table`: accuracy on each split,
training time and the peak resident memory of each run. In quick mode without `--encoder`, a tiny
random BERT is written to a temporary folder (`train_bert_hf.write_tiny_encoder`), so everything
runs offline.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ch06.imdb import train_bert_hf, train_gpt, train_sklearn_logreg
from ch06.imdb.labeled_data import LabeledData, add_data_args, data_from_args
from ch06.imdb.report import table
from llmfs.cli import Parser, add_quick_argument, device_name, run
from llmfs.runtime import outputs_dir

KINDS = ("gpt", "encoder", "logreg")


def compare(data: LabeledData, *, quick: bool = False, gpt_model: str = "gpt2", gpt_settings: dict | None = None,
            gpt_cfg: dict | None = None, encoders: list[str | Path] | None = None,
            encoder_settings: dict | None = None, vectorizer: str = "count", kinds=KINDS, device=None) -> list[dict]:
    """Train every kind in `kinds` on `data`; returns their result rows (GPT, encoders, baseline) and prints the table.

    quick: the small random-init GPT (or `gpt_cfg`) and, without `encoders`, a tiny random BERT.
    """
    results = []
    with tempfile.TemporaryDirectory(prefix="tiny-encoder-") as tmp:
        if "gpt" in kinds:
            print("=== GPT ===")
            row = train_gpt.train_gpt(data, gpt_settings, mode="quick" if quick else "pretrained",
                                      model_name=gpt_model, cfg=gpt_cfg, device=device)
            row.pop("classifier")
            results.append(row)
        if "encoder" in kinds:
            if not encoders and quick:
                encoders = [train_bert_hf.write_tiny_encoder(Path(tmp) / "tiny-bert", "bert",
                                                             list(data.train["text"]))]
            for encoder in encoders or []:
                print(f"=== encoder {encoder} ===")
                row = train_bert_hf.train_bert_hf(data, encoder, encoder_settings, quick=quick, device=device)
                row.pop("classifier")
                results.append(row)
        if "logreg" in kinds:
            print("=== logistic regression ===")
            row = train_sklearn_logreg.train_sklearn_logreg(data, vectorizer)
            row.pop("classifier")
            results.append(row)
    print()
    print(table(results))
    return results


def parser() -> Parser:
    p = Parser(prog="python -m ch06.imdb",
               description="GPT-2, transformers encoders and logistic regression on one labelled text data set.")
    add_data_args(p, outputs_dir("ch06-imdb"))
    add_quick_argument(p, "small random-init GPT and, without --encoder, a tiny random BERT (offline)")
    p.add_argument("--gpt-model", default="gpt2", help="pretrained GPT-2 size for the GPT row (default gpt2)")
    p.add_argument("--encoder", action="append", default=None,
                   help="an encoder folder or Hub id (repeat for several), e.g. bert-base-uncased")
    p.add_argument("--vectorizer", choices=train_sklearn_logreg.VECTORIZERS, default="count",
                   help="the baseline's features: count (the book) or tfidf")
    p.add_argument("--only", choices=KINDS, action="append", help="run only these kinds (repeatable)")
    p.add_argument("--seed", type=int, default=123, help="seed of the --data split and the training (default 123)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.imdb [options]`; returns the exit code."""
    args = parser().parse_args(argv)

    def work():
        kinds = tuple(args.only or KINDS)
        if "logreg" in kinds:
            train_sklearn_logreg.require_sklearn()
        data = data_from_args(args, seed=args.seed)
        print(data.describe())
        if "encoder" in kinds and not args.encoder and not args.quick:
            print("no --encoder given: the table has no encoder row (e.g. --encoder bert-base-uncased)")
        seed = {"seed": args.seed}
        compare(data, quick=args.quick, gpt_model=args.gpt_model, gpt_settings=seed, encoders=args.encoder,
                encoder_settings=seed, vectorizer=args.vectorizer, kinds=kinds, device=args.device)

    return run(work, argv)


if __name__ == "__main__":
    sys.exit(main())
