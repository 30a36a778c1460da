"""Plot needle-eval results: a heatmap PNG and a markdown table.

    python scripts/plot_needle.py results.json                      # -> results.png
    python scripts/plot_needle.py multi_4_2.json multi_4_4.json --output=multi.png
    python scripts/plot_needle.py results.json --score=substring    # the original's score

Single-needle results give accuracy over (context length x depth), as in the LWM paper's
figure; multi-needle results (several files, one per (N, R) run, may be combined) give
accuracy over (N, R) and per context length. Accuracy is the strict score (`--score=substring`
for the original's); results written before it existed are rescored from their responses.
Results and the PNG may be in a bucket (gs://bucket/needle/results.json).
"""
import argparse
import sys

from lwm import cli, storage
from lwm.needle import SCORES, load_results, plot_needle_results, plot_path_for, summary_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON file(s) written by scripts/eval_needle*.py")
    parser.add_argument("--output", default="", help="PNG path (default: the first results file with .png)")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--score", default="strict", choices=SCORES,
                        help="strict: the first numbers of a response must be the needles (default); substring: "
                             "the original's, the response contains the number")
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    with cli.user_errors(args.verbose):
        results = []
        for path in args.results:
            if not storage.isfile(path):
                raise FileNotFoundError(f"{path}: no results (no such file)")
            loaded = load_results(path)
            if not loaded:
                raise ValueError(f"{path}: no results (an empty list)")
            results.extend(loaded)
        kinds = {"needles_info" in r for r in results}
        if len(kinds) > 1:
            raise ValueError("the files mix single-needle and multi-needle results; plot them separately")
        print(summary_table(results, args.score))
        path = plot_needle_results(results, args.output or plot_path_for(args.results[0]), args.title, args.score)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
