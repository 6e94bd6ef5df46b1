"""The docs agree with their sources: figures that README.md and docs/*.md quote from results/*.csv,
results/curves/ and the benchmark tables equal those sources as printed; README stays a short front page
that links the getting-started page first; every relative link resolves; LICENSE and CITATION.cff are
there and CITATION.cff is valid CFF 1.2.0; the zero-argument run says why its recipe differs.

Each quoted figure is a CLAIMS entry: the sentence as the page prints it, rebuilt from the source. When
a result changes, the test names the sentence to correct."""

import csv
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "results"


def text(page: str) -> str:
    """A page's text with every run of white space made one blank, as a reader sees a paragraph."""
    return re.sub(r"\s+", " ", (ROOT / page).read_text())


def r(value, places: int) -> str:
    """A number rounded as a person writes it (half up: 0.8895 -> 0.890), `places` decimals."""
    return str(Decimal(str(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def signed(value, places: int) -> str:
    return ("+" if Decimal(str(value)) > 0 else "") + r(value, places)


def rows(name: str) -> dict[tuple[str, str], dict]:
    """results/<name>.csv by (budget, run name)."""
    with open(RESULTS / f"{name}.csv", newline="") as f:
        return {(row["budget"], row["name"]): row for row in csv.DictReader(f)}


def cell(name: str, budget: str, run: str, column: str) -> Decimal:
    """A value as the file holds it: differences of Decimals keep the file's digits (0.8587 - 0.8692 = -0.0105)."""
    return Decimal(rows(name)[budget, run][column])


def v(name: str, budget: str, run: str, column: str, places: int) -> str:
    return r(rows(name)[budget, run][column], places)


def mean(name: str, budget: str, runs: list[str], column: str, places: int) -> str:
    values = [Decimal(rows(name)[budget, run][column]) for run in runs]
    return r(sum(values) / len(values), places)


def curve(run: str) -> list[dict]:
    """results/curves/<budget>-<run>.csv: one row per epoch."""
    with open(RESULTS / "curves" / f"{run}.csv", newline="") as f:
        return list(csv.DictReader(f))


def bench(heading: str, model: str, variant: str, column: str) -> float:
    """A cell of a table in docs/benchmarks.md, under the heading `### heading`."""
    section = (ROOT / "docs" / "benchmarks.md").read_text().split(f"### {heading}\n", 1)[1].lstrip("\n")
    lines = section.split("\n\n", 1)[0].splitlines()  # the table right under the heading
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [model, variant]:
            return float(cells[header.index(column)].split()[0])
    raise KeyError(f"docs/benchmarks.md ### {heading}: no row {model} {variant}")


def tta_counts():
    """The validation Dice and thresholded Jaccard of every recipe run scored without and with flips."""
    both = [row for row in rows("recipes").values() if row["val_dice_predict"] and row["val_dice_tta"]]
    dice = [(Decimal(row["val_dice_predict"]), Decimal(row["val_dice_tta"])) for row in both]
    jaccard = [Decimal(row["val_threshold_jaccard_tta"]) - Decimal(row["val_threshold_jaccard_predict"]) for row in both]
    ups = [b - a for a, b in dice if b > a]
    downs = [(a, b) for a, b in dice if b < a]
    return len(both), ups, downs, sum(d > 0 for d in jaccard), sum(d < 0 for d in jaccard)


def tta_sentence() -> str:
    n, ups, downs, _, _ = tta_counts()
    assert len(downs) == 1, "the pages say flips lowered the validation Dice of one run; results/recipes.csv differs"
    return f"flips raised validation Dice in {len(ups)} of the {n} runs scored both ways, by {r(min(ups), 4)}-" \
           f"{r(max(ups), 4)}, and lowered it in one (`size-96`, 30 epochs: {r(downs[0][0], 4)} -> {r(downs[0][1], 4)})"


def tta_prediction_sentence() -> str:
    n, ups, downs, _, _ = tta_counts()
    return f"raised the validation Dice of {len(ups)} of the {n} models scored both ways and lowered it for one " \
           f"({r(downs[0][0], 4)} -> {r(downs[0][1], 4)})"


def tta_jaccard_sentence() -> str:
    _, _, _, up, down = tta_counts()
    return f"Thresholded Jaccard rose in {up} runs and fell in {down}."


def time_to_baseline() -> str:
    dyn, ours = curve("short-dynunet"), curve("short-default")

    def minutes(epochs: list[dict], n: int) -> float:  # the first n epochs' wall time
        return sum(float(row["seconds"]) for row in epochs[:n]) / 60

    final = float(dyn[-1]["val_dice"])
    best = max(range(len(dyn)), key=lambda i: float(dyn[i]["val_dice"]))
    passed = next(i for i, row in enumerate(ours) if float(row["val_dice"]) >= final) + 1
    return (f"DynUNet's six epochs took {r(minutes(dyn, len(dyn)), 1)} training minutes and ended at validation Dice "
            f"{r(final, 3)} (its best, {r(dyn[best]['val_dice'], 3)}, at epoch {best + 1}); `default` passed "
            f"{r(final, 3)} at the end of its {passed}th epoch, after {r(minutes(ours, passed), 1)} minutes: "
            f"**{r(minutes(ours, passed) / minutes(dyn, len(dyn)), 2)}x the baseline's time**, and its six epochs "
            f"end at {r(ours[-1]['val_dice'], 3)}")


def run_96(label: str, budget: str, run: str, against: bool) -> str:
    """A row of the 96-px table of docs/recipes.md, with the 128-px `default` of the same budget beside it."""
    def c(column):
        return v("recipes", budget, run, column, 4)

    def d(column):
        return v("recipes", budget, "default", column, 4)
    val = f"{c('val_dice')} (128 px: {d('val_dice')})" if against else c("val_dice")
    full = f"{c('val_dice_predict')} / {c('val_dice_tta')}" + (
        f" (128 px: {d('val_dice_predict')} / {d('val_dice_tta')})" if against else "")
    return (f"| {label} | {val} | {full} | {c('test_dice')} / {c('test_threshold_jaccard')} | "
            f"**{c('test_dice_tta')}** / {c('test_threshold_jaccard_tta')} | {v('recipes', budget, run, 'train_minutes', 1)} |")


def budget_minutes(name: str, budget: str) -> str:
    values = [float(row["train_minutes"]) for (b, _), row in rows(name).items() if b == budget]
    return f"{min(values):g}-{max(values):g}"


def epyc_budget_share() -> str:
    shares = [Decimal(row["train_minutes"]) / int(b.removeprefix("min")) for (b, _), row in rows("budgets-epyc-fp32").items()]
    return f"{span(shares, 2)} of the budget"


def span(values, places: int) -> str:
    """'low-high' of the values rounded as printed, or one value when they round alike."""
    low, high = r(min(values), places), r(max(values), places)
    return low if low == high else f"{low}-{high}"


def percent_range(pairs) -> str:
    return span([(a / b - 1) * 100 for a, b in pairs], 0) + "%"


def bf16_table(size: int, variant: str, column: str) -> float:
    return bench(f"{size}x{size} (bf16)", "ours-instance", variant, column)


def bf16_speedups() -> list[float]:
    """bf16's training images/s over float32's at 96 and 128 px (NCHW, instance norm)."""
    return [bf16_table(s, "bf16", "train img/s") / bf16_table(s, "fp32", "train img/s") for s in (96, 128)]


def bf16_memory() -> list[float]:
    return [bf16_table(s, "bf16", "peak train memory MB") / bf16_table(s, "fp32", "peak train memory MB") for s in (96, 128)]


def channels_last_slowdowns() -> list[float]:
    """Channels-last's training images/s over NCHW's in bf16 with instance norm."""
    return [bf16_table(s, "bf16-cl", "train img/s") / bf16_table(s, "bf16", "train img/s") for s in (96, 128)]


R, E, B = "recipes", "budgets-epyc-fp32", "budgets"  # results/<name>.csv
SEEDS_96 = ["size-96", "size-96-seed-1", "size-96-seed-2"]
SEEDS_64 = ["size-64", "size-64-seed-1", "size-64-seed-2"]
SEEDS_128 = ["size-128", "size-128-seed-1", "size-128-seed-2"]
SHORT_SEEDS = ["default", "seed-1", "seed-2"]
PRESETS = ["default", "augment-none", "augment-light", "augment-full"]  # default: flips


def dice(name: str, budget: str, run: str, places: int = 3) -> str:
    """Test Dice with predict.py's defaults (flip TTA)."""
    return v(name, budget, run, "test_dice_tta", places)


def jaccard(name: str, budget: str, run: str, places: int = 3) -> str:
    """Test thresholded Jaccard with predict.py's defaults (flip TTA)."""
    return v(name, budget, run, "test_threshold_jaccard_tta", places)


def val(name: str, budget: str, run: str, places: int = 3) -> str:
    return v(name, budget, run, "val_dice", places)


def screen(run: str) -> str:
    """Validation Dice of a one-factor screen."""
    return val(R, "screen", run)


def screen_change(run: str) -> str:
    """A screen's validation Dice against `default`'s, signed."""
    return signed(cell(R, "screen", run, "val_dice") - cell(R, "screen", "default", "val_dice"), 3)


def screen_cost(run: str) -> str:
    return screen_change(run).lstrip("-")


def listed(values: list[str]) -> str:
    """'a, b and c'."""
    return ", ".join(values[:-1]) + " and " + values[-1]


def plain_form_gain(column: str) -> str:
    """How much more of `column` ours-batch has than ours-plain in the CPU tables at 128 and 256 px."""
    return percent_range([(bench(f"{s}x{s}", "ours-batch", "fp32-cl", column), bench(f"{s}x{s}", "ours-plain", "fp32", column))
                          for s in (128, 256)])


def preset_spread() -> str:
    values = [cell(R, "screen", run, "val_dice") for run in PRESETS]
    return r(max(values) - min(values), 3)


def short_budget() -> str:
    gap = [cell(R, "short", "default", column) - cell(R, "short", "dynunet", column)
           for column in ("test_dice_tta", "test_threshold_jaccard_tta")]
    return (f"`default` reaches test Dice {dice(R, 'short', 'default')} and thresholded Jaccard {jaccard(R, 'short', 'default')} "
            f"with flip TTA ({v(R, 'short', 'default', 'test_dice', 3)} / {v(R, 'short', 'default', 'test_threshold_jaccard', 3)} "
            f"with `--no-tta`), against DynUNet's {dice(R, 'short', 'dynunet')} / {jaccard(R, 'short', 'dynunet')}: "
            f"{r(gap[0], 3)} Dice and {r(gap[1], 3)} thresholded Jaccard above the baseline. Three seeds give a mean of "
            f"{mean(R, 'short', SHORT_SEEDS, 'test_dice_tta', 3)} / {mean(R, 'short', SHORT_SEEDS, 'test_threshold_jaccard_tta', 3)}.")


def budget_seeds(name: str, budget: str, mean_places: int, seeds: list[str] = SEEDS_96) -> str:
    return (f"Three seeds give test Dice {listed([dice(name, budget, s) for s in seeds])} "
            f"(mean {mean(name, budget, seeds, 'test_dice_tta', mean_places)}) and thresholded Jaccard "
            f"{listed([jaccard(name, budget, s) for s in seeds])} (mean {mean(name, budget, seeds, 'test_threshold_jaccard_tta', 3)})")


def losses_from(run: str, column: str, first_epoch: int = 40) -> str:
    values = [Decimal(row[column]) for row in curve(run)[first_epoch - 1:]]
    return f"{r(min(values), 3)} and {r(max(values), 3)}"



CLAIMS = [  # (page, the sentence as the page prints it, rebuilt from its source)
    # README
    ("README.md", lambda: f"the recipe study's 15 epochs at 96 px reached test Dice {dice(R, 'long', 'size-96')} in "
                          f"{v(R, 'long', 'size-96', 'train_minutes', 1)} training minutes"),
    ("README.md", lambda: f"other seeds of the 6-epoch, 128-px run gave test Dice {dice(R, 'short', 'seed-1')} and "
                          f"{dice(R, 'short', 'seed-2')}, and of the 15-epoch, 96-px run {dice(R, 'long', 'size-96-seed-1')}"),
    ("README.md", lambda: f"the same 10-minute command reached test Dice {mean(E, 'min10', SEEDS_96, 'test_dice_tta', 3)} on a "
                          f"2-core AMD EPYC, and 30 minutes {mean(E, 'min30', SEEDS_96, 'test_dice_tta', 3)}"),
    ("README.md", lambda: f"three seeds each, {mean(B, 'min30', SEEDS_128, 'test_dice_tta', 3)} against "
                          f"{mean(B, 'min10', SEEDS_96, 'test_dice_tta', 3)} test Dice"),
    ("README.md", lambda: " and ".join(f"{r(Decimal(rows(B)['min30', run]['other_cpu']) * 100, 0)}%"
                                       for run in ("size-96", "size-128-augment-full")) + " of the CPU busy"),
    ("README.md", lambda: f"256 px takes about {r(bench('256x256', 'ours-instance', 'fp32-cl', 'ISIC epoch at this size'), 0)} minutes"),
    ("README.md", lambda: f"bf16 trains {span(bf16_speedups(), 1)}x the images a second of float32"),
    # the benchmark tables, quoted on their own page and others
    ("docs/benchmarks.md", lambda: "bf16 trains " + " and ".join(f"{r(x, 2)}x ({s} px)" for s, x in zip((96, 128), bf16_speedups()))
                                   + f" as many images a second as float32, in {span([x * 100 for x in bf16_memory()], 0)}% of the memory"),
    ("docs/benchmarks.md", lambda: f"({span(channels_last_slowdowns(), 2)}x NCHW's training speed in bf16)"),
    ("docs/training.md", lambda: f"channels-last trained at {span(channels_last_slowdowns(), 2)}x NCHW's speed"),
    ("docs/training.md", lambda: f"bf16 trained {span(bf16_speedups(), 1)}x as many images a second at 96 and 128 px"),
    ("docs/architecture.md", lambda: f"`ours-batch` (this form) trains {plain_form_gain('train img/s')} and infers "
                                     f"{plain_form_gain('inference img/s')} more images a second than `ours-plain`"),
    # recipes.md, what each setting bought: the one-factor screens
    ("docs/recipes.md", lambda: f"instance norm {screen('default')}, batch norm {screen('norm-batch')} ({screen_change('norm-batch')})"),
    ("docs/recipes.md", lambda: f"0 gives {screen('default')}, the paper's 0.3 gives {screen('dropout-0.3')} ({screen_change('dropout-0.3')})"),
    ("docs/recipes.md", lambda: f"Dice + BCE {screen('default')}, Dice alone {screen('loss-dice')} ({screen_change('loss-dice')})"),
    ("docs/recipes.md", lambda: f"1e-3 {screen('lr-1e-3')}, 2e-3 {screen('default')}, 4e-3 {screen('lr-4e-3')}"),
    ("docs/recipes.md", lambda: f"flips {screen('default')}, none {screen('augment-none')}, light {screen('augment-light')}, "
                                f"full {screen('augment-full')}"),
    ("docs/recipes.md", lambda: f"8 gives {screen('batch-8')} ({screen_change('batch-8')}, within noise); at the short budget "
                                f"{val(R, 'short', 'batch-8', 4)} against {val(R, 'short', 'default', 4)}"),
    ("docs/recipes.md", lambda: f"96 px {val(R, 'short', 'size-96')} in {v(R, 'short', 'size-96', 'train_minutes', 1)} training "
                                f"minutes, 192 px {val(R, 'short', 'size-192')} in {v(R, 'short', 'size-192', 'train_minutes', 1)} "
                                f"({v(R, 'short', 'default', 'train_minutes', 1)} at 128)"),
    ("docs/recipes.md", lambda: f"reach validation Dice {listed([val(R, 'short', s, 4) for s in SHORT_SEEDS])} and test Dice with TTA "
                                f"{listed([dice(R, 'short', s) for s in SHORT_SEEDS])} (thresholded Jaccard "
                                f"{', '.join(jaccard(R, 'short', s) for s in SHORT_SEEDS)})"),
    ("docs/recipes.md", tta_sentence),
    ("docs/recipes.md", tta_jaccard_sentence),
    ("docs/prediction.md", tta_prediction_sentence),
    # recipes.md, against the baseline
    ("docs/recipes.md", time_to_baseline),
    ("docs/recipes.md", short_budget),
    ("docs/recipes.md", lambda: f"At 128 px, `default` gives test Dice {dice(R, 'long', 'default')} / thresholded Jaccard "
                                f"{jaccard(R, 'long', 'default')} and {dice(R, 'long30', 'default')} / {jaccard(R, 'long30', 'default')} "
                                f"with TTA."),
    ("docs/recipes.md", lambda: run_96("`long` (15 epochs)", "long", "size-96", True)),
    ("docs/recipes.md", lambda: run_96("`long`, `--seed 1` (`size-96-seed-1`)", "long", "size-96-seed-1", False)),
    ("docs/recipes.md", lambda: run_96("`long30` (30 epochs)", "long30", "size-96", True)),
    ("docs/recipes.md", lambda: "three seeds of the short budget span test Dice "
                                f"{span([cell(R, 'short', s, 'test_dice_tta') for s in SHORT_SEEDS], 3)}, and two seeds of the "
                                "15-epoch, 96-px run span validation Dice "
                                f"{span([cell(R, 'long', s, 'val_dice') for s in ('size-96', 'size-96-seed-1')], 4)}"),
    # recipes.md, time budgets in bf16 on the Xeon (epochs from results/curves/)
    ("docs/recipes.md", lambda: f"96 px (validation {val(B, 'min5', 'size-96')}) is chosen over 64 px ({val(B, 'min5', 'size-64')}) "
                                f"and 128 px ({val(B, 'min5', 'size-128')}): bf16 fits {len(curve('min5-size-96'))} epochs of 96 px "
                                f"into 5 minutes"),
    ("docs/recipes.md", lambda: budget_seeds(B, "min5", 3)),
    ("docs/recipes.md", lambda: f"96 px (validation {val(B, 'min10', 'size-96')}) is chosen over 128 px ({val(B, 'min10', 'size-128')}) "
                                f"and 160 px ({val(B, 'min10', 'size-160')}): bf16 fits {len(curve('min10-size-96'))} epochs of 96 px, "
                                f"{len(curve('min10-size-128'))} of 128 px and {len(curve('min10-size-160'))} of 160 px"),
    ("docs/recipes.md", lambda: budget_seeds(B, "min10", 4)),
    ("docs/recipes.md", lambda: f"128 px reached test Dice {dice(B, 'min10', 'size-128')}, 160 px {dice(B, 'min10', 'size-160')}"),
    ("docs/recipes.md", lambda: f"came to {budget_minutes(B, 'min10')} minutes for the 10-minute budget and "
                                f"{budget_minutes(B, 'min5')} for the 5-minute one"),
    ("docs/recipes.md", lambda: f"On the AMD machine the wall time came to {epyc_budget_share()}"),
    ("docs/recipes.md", lambda: f"128 px (validation {val(B, 'min30', 'size-128', 4)}) is chosen over 96 px "
                                f"({val(B, 'min30', 'size-96', 4)}), 96 px with `--augment full` "
                                f"({val(B, 'min30', 'augment-full', 4)}) and 128 px with it "
                                f"({val(B, 'min30', 'size-128-augment-full', 4)}): bf16 fits {len(curve('min30-size-128'))} epochs of "
                                f"128 px, {len(curve('min30-size-96'))} of 96 px and {len(curve('min30-augment-full'))} of 96 px "
                                f"with full augmentation"),
    ("docs/recipes.md", lambda: budget_seeds(B, "min30", 3, SEEDS_128)),
    ("docs/recipes.md", lambda: f"Full augmentation at 96 px reached test Dice {dice(B, 'min30', 'augment-full')} / thresholded "
                                f"Jaccard {jaccard(B, 'min30', 'augment-full')}, at 128 px {dice(B, 'min30', 'size-128-augment-full')} / "
                                f"{jaccard(B, 'min30', 'size-128-augment-full')}"),
    # [-2]: the run with full augmentation ended on an epoch of one step
    ("docs/recipes.md", lambda: f"the training loss fell to {r(curve('min30-size-96')[-1]['train_loss'], 3)} while the validation "
                                f"loss stayed between {losses_from('min30-size-96', 'val_loss')} from epoch 40 on; full "
                                f"augmentation kept the training loss at {r(curve('min30-augment-full')[-2]['train_loss'], 3)} and "
                                f"the validation loss between {losses_from('min30-augment-full', 'val_loss')}"),
    ("docs/recipes.md", lambda: f"the first two runs (128 and 96 px) ran {v(B, 'min30', 'size-128', 'train_minutes', 2)} and "
                                f"{v(B, 'min30', 'size-96', 'train_minutes', 2)} minutes, and the 96-px run with full augmentation "
                                f"{v(B, 'min30', 'augment-full', 'train_minutes', 2)}"),
    ("docs/recipes.md", lambda: f"the two 128-px seeds that followed came to {v(B, 'min30', 'size-128-seed-1', 'train_minutes', 2)} "
                                f"and {v(B, 'min30', 'size-128-seed-2', 'train_minutes', 2)} minutes, and the 128-px run with full "
                                f"augmentation to {v(B, 'min30', 'size-128-augment-full', 'train_minutes', 2)}"),
    # recipes.md, time budgets in float32 on the AMD EPYC
    ("docs/recipes.md", lambda: f"5 minutes chose 64 px (test Dice {mean(E, 'min5', SEEDS_64, 'test_dice_tta', 3)} over three seeds), "
                                f"10 minutes 96 px ({mean(E, 'min10', SEEDS_96, 'test_dice_tta', 3)}), 30 minutes 96 px "
                                f"({mean(E, 'min30', SEEDS_96, 'test_dice_tta', 3)}, thresholded Jaccard "
                                f"{mean(E, 'min30', SEEDS_96, 'test_threshold_jaccard_tta', 3)})"),
    ("docs/recipes.md", lambda: f"(validation {val(E, 'min10', 'ema-0.99', 4)} against {val(E, 'min10', 'size-96', 4)})"),
    # training.md: the default recipe's reasons, from the same screens
    ("docs/training.md", lambda: f"| 0.3 costs {screen_cost('dropout-0.3')} at a two-epoch budget |"),
    ("docs/training.md", lambda: f"the presets differ by at most {preset_spread()} at these budgets"),
    ("docs/training.md", lambda: f"Dice alone costs {screen_cost('loss-dice')} |"),
    ("docs/training.md", lambda: f"1e-3 costs {screen_cost('lr-1e-3')}, 4e-3 {screen_cost('lr-4e-3')} |"),
    ("docs/training.md", lambda: f"96 px matched 128 px on validation ({' / '.join(val(R, b, 'size-96') for b in ('short', 'long', 'long30'))} "
                                 f"against {' / '.join(val(R, b, 'default') for b in ('short', 'long', 'long30'))}; a second seed of "
                                 f"the 15-epoch run gave {val(R, 'long', 'size-96-seed-1')}"),
]


@pytest.mark.parametrize("page,claim", CLAIMS, ids=[f"{page}:{i}" for i, (page, _) in enumerate(CLAIMS)])
def test_quoted_figures_equal_their_source(page, claim):
    expected = claim()
    assert expected in text(page), f"{page} should say, as its source gives it:\n{expected}"


def test_claims_can_fail():
    """The check above finds a wrong figure: one changed digit in a quoted sentence is not on the page."""
    expected = CLAIMS[0][1]()
    wrong = re.sub(r"\d(?=\D*$)", lambda m: str((int(m.group()) + 1) % 10), expected)
    assert expected in text(CLAIMS[0][0]) and wrong not in text(CLAIMS[0][0])


# ----------------------------------------------------------------------------- the front page and links


def test_readme_stays_under_14_kb():
    assert len(README.read_bytes()) < 14_000, "README.md is the short front page: move detail under docs/"


def test_readme_links_getting_started_first():
    docs_links = re.findall(r"\]\((docs/[^)#\s]+)", README.read_text())
    assert docs_links and docs_links[0] == "docs/getting-started.md", f"README's first docs link is {docs_links[:1]}"


def test_getting_started_walks_the_run_in_order():
    """Requirements before installing; on Rangpur as it is: environment, the course's data, the GPU check on
    a100-test, a first short job, watching it (squeue's reasons), wandb, predicting once training has
    finished, copying the run home."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    order = ["## What you need", "## Part 1", "### 2. Make the Python environment", "**At every login**",
             "### 3. The course's data", "/home/groups/comp3710/ISIC2018", "### 4. Check the GPU on `a100-test`",
             "### 5. Submit the training job", "--partition=a100-test --time=00:20:00", "### 6. Watch it",
             "`PartitionConfig`", "### 7. Send the wandb run", "### 8. Predict and score", "--dependency=afterok:",
             "### 9. Copy the run home", "--overlay", "## Part 2: a laptop", "### On a Mac"]
    places = [page.find(step) for step in order]
    assert -1 not in places, f"getting-started.md lacks {order[places.index(-1)]!r}"
    assert places == sorted(places), "getting-started.md's steps are out of order"


RELATIVE_LINKS = [(page, target) for page in PAGES
                  for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
                  if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


@pytest.mark.parametrize("page,target", RELATIVE_LINKS, ids=[f"{p.name}->{t}" for p, t in RELATIVE_LINKS])
def test_relative_links_resolve(page, target):
    assert (page.parent / target.split("#")[0]).resolve().exists(), f"{page.name}: {target} does not exist"


# ----------------------------------------------------------------------------- licence and citation


def test_licence_is_mit_and_the_data_licence_is_stated():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Permission is hereby granted, free of charge" in licence
    assert "CC BY-NC 4.0" in README.read_text(), "README must keep the data's licence"


def test_citation_cff_is_valid():
    source = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", source, flags=re.M), "CITATION.cff must declare cff-version 1.2.0"
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load(source)
    for key in ("message", "title", "authors"):
        assert cff.get(key), f"CITATION.cff lacks {key}, which CFF 1.2.0 requires"
    assert cff["type"] == "software" and cff["license"] == "MIT"
    assert all(author.get("name") or author.get("family-names") for author in cff["authors"])
    paper = next(ref for ref in cff["references"] if "arXiv:1802.10508" in str(ref.get("identifiers")))
    assert paper["type"] == "article" and "BRATS 2017" in paper["title"]
    assert [a["family-names"] for a in paper["authors"]] == ["Isensee", "Kickingereder", "Wick", "Bendszus", "Maier-Hein"]


# ----------------------------------------------------------------------------- the zero-argument run


def test_the_zero_argument_run_says_why_its_recipe_differs(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)  # no data/ISIC2018 here
    config, synthetic = train.resolve_data(train.TrainConfig(), set(), resuming=False)
    out = capsys.readouterr().out
    assert synthetic and config.norm == "batch"
    assert "not the real-data recipe" in out and "docs/training.md#the-zero-argument-run" in out
    assert "## The zero-argument run" in (ROOT / "docs" / "training.md").read_text()
    assert "not the real-data recipe" in text("README.md")


# ----------------------------------------------------------------------------- the code's map


def project_imports(path: Path) -> set[str]:
    """The project's files that `path` imports, at the top or inside a function."""
    import ast

    files = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {name for name in names if name in files}
    return found


def test_code_md_lists_every_file_with_its_imports_in_an_order_without_cycles():
    rows = re.findall(r"^\| `(\w+)\.py` \|.*\| ([^|]+) \|$", (ROOT / "docs" / "code.md").read_text(), re.M)
    order = [name for name, _ in rows]
    assert sorted(order) == sorted(p.stem for p in ROOT.glob("*.py")), "docs/code.md must list every file once"
    for place, (name, imports) in enumerate(rows):
        listed = set(re.findall(r"`(\w+)\.py`", imports))
        assert listed == project_imports(ROOT / f"{name}.py"), f"docs/code.md: {name}.py imports {listed}?"
        assert imports.strip() != "nothing" or not listed
        assert listed <= set(order[:place]), f"{name}.py imports a file listed below it: {listed - set(order[:place])}"


def test_no_function_runs_over_80_lines():
    """A function a reader can hold in view: longer ones are split where their parts have names of their own."""
    import ast

    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(ROOT.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
