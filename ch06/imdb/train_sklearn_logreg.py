"""Chapter 6 bonus: the baseline the book compares the LLMs with, logistic regression on word counts.

    python -m ch06.imdb.train_sklearn_logreg                       # the IMDb splits (download_prepare_dataset)
    python -m ch06.imdb.train_sklearn_logreg --vectorizer tfidf    # TF-IDF weights instead of raw counts
    python -m ch06.imdb.train_sklearn_logreg --data reviews.jsonl --text-column review --label-column stars

The book's `train_sklearn_logreg.py`: a bag-of-words matrix (`CountVectorizer`), a `DummyClassifier`
that always answers the most frequent class (the floor any model must beat) and scikit-learn's
`LogisticRegression(max_iter=1000)`. Needs scikit-learn (`pip install scikit-learn`).
"""

from __future__ import annotations

import sys

from ch06.imdb.labeled_data import LabeledData, add_data_args, data_from_args
from ch06.imdb.report import result, track_resources
from llmfs.cli import Parser, positive_int, run
from llmfs.errors import InvalidInput
from llmfs.runtime import outputs_dir

VECTORIZERS = ("count", "tfidf")


def require_sklearn() -> None:
    """New: without scikit-learn, one line saying how to get it (before any work)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise InvalidInput("the logistic-regression baseline needs scikit-learn: pip install scikit-learn") from None


def make_vectorizer(kind: str = "count"):
    """The book's `CountVectorizer()`; New: "tfidf" scales the counts by inverse document frequency."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    if kind not in VECTORIZERS:
        raise InvalidInput(f"vectorizer must be one of {VECTORIZERS}, got {kind!r}")
    return CountVectorizer() if kind == "count" else TfidfVectorizer()


def eval(model, X_train, y_train, X_val, y_val, X_test, y_test) -> dict[str, float]:  # the book's name
    """The book's evaluation: accuracy on each split, printed; New: also returned."""
    from sklearn.metrics import accuracy_score

    # Making predictions
    y_pred_train = model.predict(X_train)
    y_pred_val = model.predict(X_val)
    y_pred_test = model.predict(X_test)

    # Calculating accuracy
    accuracy_train = accuracy_score(y_train, y_pred_train)
    accuracy_val = accuracy_score(y_val, y_pred_val)
    accuracy_test = accuracy_score(y_test, y_pred_test)

    # Printing the results
    print(f"Training Accuracy: {accuracy_train*100:.2f}%")
    print(f"Validation Accuracy: {accuracy_val*100:.2f}%")
    print(f"Test Accuracy: {accuracy_test*100:.2f}%")
    return {"train": accuracy_train, "validation": accuracy_val, "test": accuracy_test}


def train_sklearn_logreg(data: LabeledData, vectorizer: str = "count", max_iter: int = 1000,
                         dummy: bool = True) -> dict:
    """Vectorize, print the dummy baseline (with `dummy`), fit the logistic regression; returns its result row
    plus "classifier" (New: the fitted vectorizer and model as one pipeline that classifies raw texts)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    with track_resources() as stats:
        vec = make_vectorizer(vectorizer)
        X_train = vec.fit_transform(data.train["text"])
        X_val = vec.transform(data.validation["text"])
        X_test = vec.transform(data.test["text"])
        y_train, y_val, y_test = data.train["label"], data.validation["label"], data.test["label"]

        if dummy:
            # Create a dummy classifier with the strategy to predict the most frequent class
            dummy_clf = DummyClassifier(strategy="most_frequent")
            dummy_clf.fit(X_train, y_train)
            print("Dummy classifier:")
            eval(dummy_clf, X_train, y_train, X_val, y_val, X_test, y_test)
            print("\nLogistic regression classifier:")

        with track_resources() as fit:
            model = LogisticRegression(max_iter=max_iter)
            model.fit(X_train, y_train)
        accuracies = eval(model, X_train, y_train, X_val, y_val, X_test, y_test)
    parameters = int(model.coef_.size + model.intercept_.size)
    return {**result(f"logistic regression ({vectorizer})", "bag of words", accuracies, fit["seconds"],
                     stats["peak_mib"], parameters, parameters, features=X_train.shape[1]),
            "classifier": make_pipeline(vec, model)}


def parser() -> Parser:
    p = Parser(prog="python -m ch06.imdb.train_sklearn_logreg",
               description="Logistic regression on word counts: the book's baseline for the IMDb classifiers.")
    add_data_args(p, outputs_dir("ch06-imdb"))
    p.add_argument("--vectorizer", choices=VECTORIZERS, default="count",
                   help="count: the book's bag of words (default); tfidf: TF-IDF weights")
    p.add_argument("--max-iter", type=positive_int, default=1000, help="solver iterations (default 1000, as the book)")
    p.add_argument("--seed", type=int, default=123, help="seed of the --data split (default 123)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.imdb.train_sklearn_logreg [options]`; returns the exit code."""
    args = parser().parse_args(argv)

    def work():
        require_sklearn()
        data = data_from_args(args, seed=args.seed)
        print(data.describe())
        train_sklearn_logreg(data, args.vectorizer, args.max_iter)

    return run(work, argv)


if __name__ == "__main__":
    sys.exit(main())
