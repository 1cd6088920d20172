"""argparse types for the command lines: a bad value is a usage error (exit 2) before any work starts.

    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--ks", type=positive_ints, default="1,5,10")
    parser.add_argument("--out", type=output_file)
    ...
    mesh = start_data_parallel(parser, args.batch_size)   # the evaluation CLIs' common start
    report_results(results, headline, args.out)           # and ending

argparse turns the `ArgumentTypeError` these raise into its usage message and
exit status 2, so a typo costs nothing instead of failing after hours of
embedding.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

from common.metrics import configure_logging
from common.sharding import ShardingError, check_batch_divisible, initialize_distributed, make_mesh


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1, e.g. "1,5,10"."""
    parts = [part.strip() for part in text.split(",")]
    try:
        return tuple(positive_int(part) for part in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,5,10, found "
                                         f"{text!r}") from None


def output_file(text: str) -> str:
    """A file path to write: not an existing directory, in a directory that exists."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path such as "
                                         f"{os.path.join(text, 'results.json')!r}")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist ({parent!r}); create it first")
    return text


def output_dir(text: str) -> str:
    """A directory to write into: an existing directory, or a path that does not exist yet."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory; expected a directory to write "
                                         "shards into (existing or new)")
    return text


def report_results(results: dict[str, Any], headline: str, out: str | None) -> None:
    """On process 0 only: prints `headline` and `results` as JSON, and writes that JSON to `out` if given."""
    if jax.process_index() != 0:
        return
    print(headline)
    print(json.dumps(results, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def start_data_parallel(parser: argparse.ArgumentParser, batch_size: int) -> jax.sharding.Mesh:
    """A command line's start on every host: logging, the multi-host cluster (when the runtime describes
    one), a data-parallel mesh over all devices; a `batch_size` it does not divide is a usage error."""
    configure_logging()
    initialize_distributed()
    mesh = make_mesh("data_parallel")
    try:
        check_batch_divisible(batch_size, mesh)
    except ShardingError as err:
        parser.error(f"--batch-size: {err}")
    return mesh
