"""Join the shards of a sharded ``preprocess`` or ``inference`` run (``--shard i/N``; ``scripts.shards``).

    python -m scripts.merge OUT        # OUT: the --output_dir every shard wrote into

Refuses, in one line and with exit status 2, a set with a shard that has not finished, a shard twice, shards
of different counts, a short shard table or an input in two shards; otherwise writes what one unsharded run
writes: ``manifest.csv``, ``datalist.json`` and ``qc_montage.png`` (preprocess), or ``predictions.csv``,
``report.html`` and, for a BIDS input, the BIDS derivatives (inference).
"""

from __future__ import annotations

import sys

from scripts import cli, shards
from scripts.inference import merge_shards as merge_inference
from scripts.preprocess import merge_shards as merge_preprocess
from scripts.report import report_after_run


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m scripts.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the --output_dir every shard wrote into")
    args = parser.parse_args(argv)
    try:
        records = shards.finished_shards(args.output_dir)
        merge = merge_preprocess if records[0]["kind"] == "preprocess" else merge_inference
        written = merge(args.output_dir, records)
    except shards.ShardError as err:
        parser.error(str(err))
    if records[0]["kind"] == "inference":  # the whole set's report, of the model the shards recorded
        derivatives = records[0]["derivatives_dir"] if records[0].get("bids_root") else None
        report_after_run(args.output_dir, records[0].get("ckpt_path"), derivatives)
    print(f"merged {len(records)} shards -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
