"""results/paper/*.json must be an exact transcription of the paper's tables.

The paper markdown is re-parsed here independently of how the JSON was produced, and every number
of every JSON table is compared with the printed cell in the same position, so a typo, a swapped row
or a missing value fails. Skips when the paper is not available.
"""

import json
import re
from pathlib import Path

import pytest

PAPER_MD = Path("/work/shared/paper/ts-peft-paper.md")
PAPER_JSON = Path(__file__).resolve().parents[1] / "results" / "paper"

pytestmark = pytest.mark.skipif(not PAPER_MD.exists(), reason=f"{PAPER_MD} not available")


@pytest.fixture(scope="module")
def lines():
    return PAPER_MD.read_text(encoding="utf-8").splitlines()


def load(name):
    return json.loads((PAPER_JSON / f"{name}.json").read_text(encoding="utf-8"))


def tab_block(lines, *first_cells):
    """The tab-separated table whose header row starts with `first_cells` (header included)."""
    for i, line in enumerate(lines):
        if tuple(line.split("\t")[: len(first_cells)]) == first_cells:
            block = []
            for row in lines[i:]:
                if "\t" not in row:
                    return block
                block.append(row.split("\t"))
            return block
    raise AssertionError(f"table starting with {first_cells} not found in the paper")


def cell_value(text):
    """A printed cell as a number, or None for the paper's dashes."""
    text = text.strip()
    return None if text in ("-", "—", "–") else float(text)


def assert_row(printed_cells, expected, where):
    got = [cell_value(c) for c in printed_cells]
    assert got == expected, f"{where}: paper prints {printed_cells}, JSON has {expected}"


def printed_hyperparams(cell):
    return {
        ("lambda" if k == "\\lambda" else "s"): float(v) for k, v in re.findall(r"\$(s|\\lambda) = ([0-9.e-]+)\$", cell)
    }


def test_caption_and_source_fields(lines):
    for n in range(1, 7):
        table = load(f"table{n}")
        assert table["source"]["table"] == n
        assert table["source"]["caption"] in lines
        assert table["source"]["model"]


@pytest.mark.parametrize(("name", "first_header"), [("table1", "PIQA"), ("table2", "SQA")])
def test_blocked_tables_1_and_2(lines, name, first_header):
    table = load(name)
    block = tab_block(lines, "", "<i>Hyperparams</i>", first_header)
    header, rows = block[0], block[1:]
    assert [table["column_labels"][c] for c in table["columns"]] + ["Avg"] == header[2:]
    expected_rows = []
    for method in table["methods"].values():
        expected_rows.append((method["label"], "score", method))
        if "sparsity" in method:
            expected_rows.append(("Sparsity(%)", "sparsity", method))
    assert len(rows) == len(expected_rows)
    for printed, (label, kind, method) in zip(rows, expected_rows, strict=True):
        assert printed[0] == label
        values = [method[kind][c] for c in table["columns"]] + [method[kind]["avg"]]
        assert_row(printed[2:], values, f"{name} {label} {kind}")
        if kind == "score":
            hyper = {k: method[k] for k in ("s", "lambda") if k in method}
            assert hyper == printed_hyperparams(printed[1]), f"{name} {label} hyperparameters"


def test_table3(lines):
    table = load("table3")
    block = tab_block(lines, "Method", "MNLI")
    header, rows = block[0], block[1:]
    assert [table["column_labels"][c] for c in table["columns"]] + ["Avg"] == header[1:]
    cols = table["columns"]
    expected = []
    for method in table["methods"].values():
        expected.append((method["label"], [method["score"][c] for c in cols] + [method["score"]["avg"]]))
        if "sparsity" in method:
            expected.append(("Sparsity(%)", [method["sparsity"][c] for c in cols] + [method["sparsity"]["avg"]]))
            expected.append(("λ", [method["lambda"][c] for c in cols] + [None]))
    assert len(rows) == len(expected)
    for printed, (label, values) in zip(rows, expected, strict=True):
        assert printed[0] == label
        assert_row(printed[1:], values, f"table3 {label}")
    caption = table["source"]["caption"]
    assert f"$s = {table['s']:.0e}$".replace("e-04", "e-4") in caption


def test_table4(lines):
    table = load("table4")
    block = tab_block(lines, "", "PIQA")
    assert [table["column_labels"][c] for c in table["columns"]] + ["Avg"] == block[0][1:]
    rows = block[1:]
    assert [r[0] for r in rows] == list(table["selections"])
    for printed in rows:
        scores = table["selections"][printed[0]]
        assert_row(printed[1:], [scores[c] for c in table["columns"]] + [scores["avg"]], f"table4 {printed[0]}")


def test_table5(lines):
    table = load("table5")
    block = tab_block(lines, "Layer", "TS-LoRA")
    methods = list(table["methods"])
    assert block[0][1:] == ["TS-LoRA", "", "", "", "TS-DoRA", "", "", "", "TS-AdaLoRA", "", "", ""]
    assert methods == ["ts-lora", "ts-dora", "ts-adalora"]
    kinds = ["q_proj", "k_proj", "v_proj", "avg"]
    assert block[1][1:] == ["q-proj", "k-proj", "v-proj", "avg"] * 3
    body = block[2:]
    assert [r[0] for r in body] == [str(layer) for layer in table["layers"]] + ["avg"]
    for i, printed in enumerate(body):
        for m, method in enumerate(methods):
            entry = table["methods"][method]
            if printed[0] == "avg":
                expected = [entry["avg_row"][k] for k in kinds]
            else:
                expected = [entry["per_layer"][k][i] for k in kinds]
            assert_row(printed[1 + 4 * m : 5 + 4 * m], expected, f"table5 layer {printed[0]} {method}")


def test_table5_text_stats(lines):
    stats = load("table5")["text_stats"]["std"]
    text = "\n".join(lines)
    assert f"standard deviations of {stats['ts-lora']} and {stats['ts-adalora']}" in text
    assert f"much higher standard deviation of {stats['ts-dora']}" in text


def test_table6(lines):
    table = load("table6")
    block = tab_block(lines, "Task", "Data")
    assert block[0] == [
        "Task",
        "Data",
        "Rank",
        "Scale",
        "Dropout",
        "Optimizer",
        "LR",
        "Scheduler",
        "Batch",
        "Epochs",
        "Target",
    ]
    rows = block[1:]
    assert len(rows) == len(table["rows"])
    for printed, row in zip(rows, table["rows"], strict=True):
        assert printed[:2] == [row["task"], row["data"]]
        assert_row(
            [printed[i] for i in (2, 3, 4, 6, 8, 9)],
            [row[k] for k in ("rank", "scale", "dropout", "lr", "batch", "epochs")],
            f"table6 {row['data']}",
        )
        assert [printed[5], printed[7]] == [row["optimizer"], row["scheduler"]]
        assert printed[10].split(",") == row["target"]


def test_table6_text_constants(lines):
    text = "\n".join(lines)
    consts = load("table6")["from_text"]
    assert consts["csr_vit"] == {"s": 4e-5, "lambda_range": [1e-7, 1e-3]}
    assert (
        "we fix the scaling factor at $s = 4 \\times 10^{-5}$ and select λ from the interval $[10^{-7}, 10^{-3}]$"
        in text
    )
    assert consts["nlu"] == {"s": 1e-4, "lambda_range": [1e-8, 1e-3]}
    assert "we instead set $s = 1 \\times 10^{-4}$ and choose λ from $[10^{-8}, 10^{-3}]$" in text
    assert (consts["alpha_k"], consts["beta1"], consts["beta2"]) == (1, 0.9, 0.98)
    assert "$\\alpha_k = 1$, $\\beta_1 = 0.9$, and $\\beta_2 = 0.98$" in text
    assert consts["adapter_hidden_size"] == 32 and "using a hidden size of 32" in text
    assert consts["ranks"]["csr"] == {"lora_dora": 32, "adalora_init": 64, "adalora_target": 32}
    assert (
        "rank of both LoRA and DoRA to 32, and configure AdaLoRA with an initial rank of 64 and a target rank of 32"
        in text
    )
    assert consts["ranks"]["vit"] == {"lora_dora": 128, "adalora_init": 256, "adalora_target": 128}
    assert "rank 128 and setting the initial and target ranks of AdaLoRA to 256 and 128" in text
    assert consts["ranks"]["nlu"] == {"lora_target": 4, "adalora_target": 4}
    assert "the target ranks of LoRA and AdaLoRA are both set to 4" in text
