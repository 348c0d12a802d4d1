"""Chapter 6 bonus: the 50,000 IMDb movie reviews as train.csv, validation.csv and test.csv.

    python -m ch06.imdb.download_prepare_dataset                       # into outputs/ch06-imdb
    python -m ch06.imdb.download_prepare_dataset --archive ~/aclImdb_v1.tar.gz --output-dir data/imdb

The book's `download_prepare_dataset.py`: the Stanford archive (Maas et al., 2011; 84 MB) is fetched,
its 25,000 training and 25,000 test reviews (half positive, half negative) are read into one table
with the columns `text` and `label` (pos = 1, neg = 0), shuffled with seed 123 and cut into 35,000
training, 5,000 validation and 10,000 test reviews. The archive comes through `llmfs.download`
(the data mirror $LLMFS_DATA_MIRROR, the cache, else the canonical URL; its sha256 is checked, as
TensorFlow Datasets records it), so offline the one-line error says where to put it. Only the
labelled reviews are extracted (not the 50,000 unlabelled ones in aclImdb/train/unsup), into a
temporary folder renamed into place, and the CSV files are written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from ch06.gpt_class_finetune import write_csv
from llmfs.cli import Parser, check_output_dir, path_argument, run
from llmfs.download import DATA_FILES, DataFile, get_data_file, sha256sum
from llmfs.errors import InvalidInput
from llmfs.runtime import outputs_dir

IMDB_ARCHIVE = "aclImdb_v1.tar.gz"
# The archive joins the project's table of data files (mirror, cache, verified download) from here,
# so llmfs knows it without importing this chapter. The sha256 is the one TensorFlow Datasets records
# for this URL (84,125,825 bytes); the whole archive is verified, and this module extracts the reviews.
DATA_FILES.setdefault(IMDB_ARCHIVE, DataFile(
    IMDB_ARCHIVE, "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"))
IMDB_URL = DATA_FILES[IMDB_ARCHIVE].url
SIZES = (35000, 5000, 10000)  # the book's train / validation / test sizes
# A labelled review inside the archive: aclImdb/<train|test>/<pos|neg>/<id>_<rating>.txt
REVIEW_MEMBER = re.compile(r"^aclImdb/(train|test)/(pos|neg)/[^/]+\.txt$")


def check_archive(path: str | os.PathLike) -> Path:
    """A local copy of the archive (--archive): present and the very file the URL serves (sha256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--archive {path} does not exist")
    actual, expected = sha256sum(path), DATA_FILES[IMDB_ARCHIVE].sha256
    if actual != expected:
        raise InvalidInput(f"--archive {path} is not {IMDB_ARCHIVE} from {IMDB_URL} (sha256 {actual}, expected "
                           f"{expected})")
    return path


def download_and_extract_dataset(dataset_url: str = IMDB_URL, target_file: str | os.PathLike | None = None,
                                 directory: str | os.PathLike = "aclImdb") -> Path:
    """Make `directory` hold the archive's labelled reviews (aclImdb/train|test/pos|neg/*.txt); returns it.

    New: `target_file` is a local copy of the archive to use (checked); without it the archive comes
    from `llmfs.download.get_data_file` (mirror, cache, or `dataset_url`, verified).
    """
    directory = Path(directory)
    if directory.exists():
        print(f"Directory `{directory}` already exists. Skipping download.")
        return directory
    archive = check_archive(target_file) if target_file is not None else get_data_file(IMDB_ARCHIVE, url=dataset_url)
    print("Extracting dataset ...")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # New: into a temporary folder beside the target, renamed when complete (an interrupted run leaves no half folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar if m.isfile() and REVIEW_MEMBER.match(m.name)]
                if not members:
                    raise InvalidInput(f"{archive} holds no reviews (expected aclImdb/train/pos/*.txt and the like)")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            raise InvalidInput(f"{archive} is not a readable .tar.gz archive ({exc})") from None
        os.replace(tmp / "aclImdb", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_dataset_to_dataframe(basepath: str | os.PathLike = "aclImdb", labels: dict | None = None) -> pd.DataFrame:
    """Every review of the test and train folders as a row (text, label), shuffled with seed 123."""
    labels = {"pos": 1, "neg": 0} if labels is None else labels
    texts, targets = [], []  # New: one DataFrame at the end instead of one per file (50,000 of them)
    for subset in ("test", "train"):
        for label in ("pos", "neg"):
            path = os.path.join(basepath, subset, label)
            if not os.path.isdir(path):  # New: a clear error for a folder of another layout
                raise FileNotFoundError(f"{path} does not exist: {basepath} is not an extracted aclImdb folder")
            for file in sorted(os.listdir(path)):
                with open(os.path.join(path, file), "r", encoding="utf-8") as infile:
                    texts.append(infile.read())
                    targets.append(labels[label])
    df = pd.DataFrame({"text": texts, "label": targets})
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)  # Shuffle the DataFrame
    return df


def partition_and_save(df: pd.DataFrame, sizes: tuple[int, int, int] = SIZES,
                       output_dir: str | os.PathLike = ".") -> dict[str, Path]:
    """Shuffle (seed 123), cut into sizes[0] training and sizes[1] validation rows, the rest for testing,
    and write train.csv, validation.csv and test.csv into `output_dir` (New: atomically)."""
    if len(df) <= sizes[0] + sizes[1]:
        raise InvalidInput(f"{len(df)} reviews leave no test rows after {sizes[0]} training and {sizes[1]} "
                           "validation rows")
    # Shuffle the DataFrame
    df_shuffled = df.sample(frac=1, random_state=123).reset_index(drop=True)

    # Get indices for where to split the data
    train_end = sizes[0]
    val_end = sizes[0] + sizes[1]

    # Split the DataFrame
    train = df_shuffled.iloc[:train_end]
    val = df_shuffled.iloc[train_end:val_end]
    test = df_shuffled.iloc[val_end:]

    # Save to CSV files
    output_dir = Path(output_dir)
    return {name: write_csv(part, output_dir / f"{name}.csv")
            for name, part in (("train", train), ("validation", val), ("test", test))}


def prepare_imdb(output_dir: str | os.PathLike | None = None, archive: str | os.PathLike | None = None,
                 sizes: tuple[int, int, int] = SIZES, keep_extracted: bool = False) -> dict[str, Path]:
    """The book's main block: archive -> reviews -> the three CSV files in `output_dir` (outputs/ch06-imdb)."""
    output_dir = Path(output_dir) if output_dir is not None else outputs_dir("ch06-imdb")
    folder = output_dir / "aclImdb"
    existed = folder.exists()
    print("Downloading dataset ...")
    download_and_extract_dataset(IMDB_URL, archive, folder)
    print("Creating data frames ...")
    df = load_dataset_to_dataframe(folder)
    print("Partitioning and saving data frames ...")
    paths = partition_and_save(df, sizes, output_dir)
    if not keep_extracted and not existed:  # New: the CSV files hold it all; 50,000 small files are not kept
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def sizes_argument(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes[:2]) < 1:
        raise argparse.ArgumentTypeError(f"must be three whole numbers TRAIN,VALIDATION,TEST, got {text}")
    return sizes


def parser() -> Parser:
    default = outputs_dir("ch06-imdb")
    p = Parser(prog="python -m ch06.imdb.download_prepare_dataset",
               description="Download the IMDb reviews (or use a local copy) and write train/validation/test.csv.")
    p.add_argument("--output-dir", type=path_argument, default=default,
                   help=f"where the CSV files go (default {default})")
    p.add_argument("--archive", type=path_argument, default=None,
                   help=f"a local copy of {IMDB_ARCHIVE} (else: $LLMFS_DATA_MIRROR, the cache, the download)")
    p.add_argument("--sizes", type=sizes_argument, default=SIZES,
                   help="training,validation rows and the test rows the rest gives (default 35000,5000,10000)")
    p.add_argument("--keep-extracted", action="store_true", help="keep the extracted aclImdb folder")
    p.add_argument("--overwrite", action="store_true", help="replace CSV files already in --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch06.imdb.download_prepare_dataset [options]`; returns the exit code."""
    args = parser().parse_args(argv)

    def work():
        if args.archive is not None:
            check_archive(args.archive)
        folder = check_output_dir(args.output_dir)
        existing = [name for name in ("train.csv", "validation.csv", "test.csv") if (folder / name).exists()]
        if existing and not args.overwrite:
            raise FileExistsError(f"--output-dir {folder} already holds {', '.join(existing)}; pass --overwrite "
                                  "to write them again, or choose another --output-dir")
        prepare_imdb(folder, args.archive, args.sizes, args.keep_extracted)

    return run(work, argv)


if __name__ == "__main__":
    sys.exit(main())
