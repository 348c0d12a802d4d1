"""The stored outputs of the chapter 2, chapter 3 and appendix A notebooks show the book's numbers.

Fast (no execution): each test reads a notebook's stored outputs from the .ipynb JSON, finds the
cell by a line of its source, and checks that the book's printed numbers appear in its output, in
order, within the printed precision. The notebooks use the book's inputs and seeds and store the
outputs of a full-mode run, so a change that breaks read-along fidelity (other example data, another
seed, a listing that computes something else, or outputs re-stored from another mode) fails here.
"""

from __future__ import annotations

import json
import re

import pytest

from nbexec import REPO

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def load(rel: str) -> list[dict]:
    return json.loads((REPO / rel).read_text(encoding="utf-8"))["cells"]


def output_of(cells: list[dict], source_line: str) -> str:
    """The stored text output of the one code cell whose source contains `source_line`."""
    found = [c for c in cells if c["cell_type"] == "code" and source_line in "".join(c["source"])]
    assert len(found) == 1, f"{len(found)} code cells contain {source_line!r}"
    texts = []
    for out in found[0].get("outputs", []):
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        texts.append("".join(text))
    return "".join(texts)


def numbers(text: str) -> list[float]:
    text = re.sub(r"<[^>]*>", "", text)  # grad_fn=<CatBackward0> is not a printed value
    return [float(n) for n in NUMBER.findall(text)]


def assert_shows(text: str, expected: list[float], tol: float = 1e-4) -> None:
    """`expected` appears as a contiguous run of the numbers printed in `text`."""
    got = numbers(text)
    n = len(expected)
    for start in range(len(got) - n + 1):
        if all(abs(g - e) <= tol for g, e in zip(got[start:start + n], expected)):
            return
    raise AssertionError(f"the book's numbers {expected} are not in the stored output:\n{text[:600]}")


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


@pytest.mark.parametrize("rel", ["ch02/ch02.ipynb", "ch02/exercise-solutions.ipynb", "ch03/ch03.ipynb",
                                 "ch03/exercise-solutions.ipynb", "appendix-A/code-part1.ipynb",
                                 "appendix-A/code-part2.ipynb", "appendix-A/exercise-solutions.ipynb"])
def test_outputs_come_from_a_full_mode_run(rel):
    cells = load(rel)
    assert "full mode" in "".join(cells[0]["source"]), "the first cell says which mode the outputs come from"
    printed = [t for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
               for t in ["".join(o.get("text", ""))] if "quick mode:" in t]
    assert printed and all("quick mode: False" in t for t in printed), "stored outputs are from quick mode"


# --- chapter 2 ---------------------------------------------------------------------------------------

def test_ch02_tokenizers_print_the_books_ids():
    cells = load("ch02/ch02.ipynb")
    assert_shows(output_of(cells, 'print("Total number of character:", len(raw_text))'), [20479])
    assert_shows(output_of(cells, "print(preprocessed[:30])"), [4690])
    assert_shows(output_of(cells, "vocab_size = len(all_words)"), [1130])
    assert_shows(output_of(cells, "tokenizer = SimpleTokenizerV1(vocab)"),
                 [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7])
    assert_shows(output_of(cells, 'all_tokens.extend(["<|endoftext|>", "<|unk|>"])'), [1132, 1127, 1128, 1129, 1130, 1131])
    assert_shows(output_of(cells, "tokenizer = SimpleTokenizerV2(vocab)"),
                 [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7])
    assert_shows(output_of(cells, 'integers = tokenizer.encode(text, allowed_special={"<|endoftext|>"})'),
                 [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 1659, 617,
                  34680, 27271, 13])


def test_ch02_sliding_window_and_embeddings_print_the_books_numbers():
    cells = load("ch02/ch02.ipynb")
    assert_shows(output_of(cells, "enc_text = tokenizer.encode(raw_text)"), [5145])
    assert_shows(output_of(cells, "x = enc_sample[:context_size]"), [290, 4920, 2241, 287, 4920, 2241, 287, 257])
    assert_shows(output_of(cells, "first_batch = next(data_iter)"), [40, 367, 2885, 1464, 367, 2885, 1464, 1807])
    assert_shows(output_of(cells, "second_batch = next(data_iter)"), [367, 2885, 1464, 1807, 2885, 1464, 1807, 3619])
    assert_shows(output_of(cells, 'print("Inputs:\\n", inputs)'),
                 [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138, 257, 7026])
    weight = [[0.3374, -0.1778, -0.1690], [0.9178, 1.5810, 1.3010], [1.2753, -0.2010, -0.1606],
              [-0.4015, 0.9666, -1.1481], [-1.1589, 0.3255, -0.6315], [-2.8400, -0.7849, -1.4096]]
    assert_shows(output_of(cells, "embedding_layer = torch.nn.Embedding(vocab_size, output_dim)\nprint(embedding_layer.weight)"), flat(weight))
    assert_shows(output_of(cells, "print(embedding_layer(input_ids))"), flat([weight[i] for i in (2, 3, 5, 1)]))
    assert_shows(output_of(cells, "input_embeddings = token_embeddings + pos_embeddings"), [8, 4, 256])


def test_ch02_exercise_bpe_of_unknown_words():
    assert_shows(output_of(load("ch02/exercise-solutions.ipynb"), 'text = "Akwirw ier"'),
                 [33901, 86, 343, 86, 220, 959])


# --- chapter 3 ---------------------------------------------------------------------------------------

def test_ch03_simple_attention_prints_the_books_numbers():
    cells = load("ch03/ch03.ipynb")
    assert_shows(output_of(cells, "attn_scores_2[i] = torch.dot(x_i, query)"),
                 [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865])
    assert_shows(output_of(cells, "attn_weights_2_tmp = attn_scores_2 / attn_scores_2.sum()"),
                 [0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656])
    assert_shows(output_of(cells, "attn_weights_2 = torch.softmax(attn_scores_2, dim=0)"),
                 [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    assert_shows(output_of(cells, "context_vec_2 += attn_weights_2[i] * x_i"), [0.4419, 0.6515, 0.5683])
    assert_shows(output_of(cells, "all_context_vecs = attn_weights @ inputs"),
                 flat([[0.4421, 0.5931, 0.5790], [0.4419, 0.6515, 0.5683], [0.4431, 0.6496, 0.5671],
                       [0.4304, 0.6298, 0.5510], [0.4671, 0.5910, 0.5266], [0.4177, 0.6503, 0.5645]]))


def test_ch03_trainable_attention_prints_the_books_numbers():
    cells = load("ch03/ch03.ipynb")
    assert_shows(output_of(cells, "query_2 = x_2 @ W_query"), [0.4306, 1.4551])
    assert_shows(output_of(cells, "attn_score_22 = query_2.dot(keys_2)"), [1.8524])
    assert_shows(output_of(cells, "attn_scores_2 = query_2 @ keys.T"), [1.2705, 1.8524, 1.8111, 1.0795, 0.5577, 1.5440])
    assert_shows(output_of(cells, "attn_weights_2 = torch.softmax(attn_scores_2 / d_k**0.5, dim=-1)"),
                 [0.1500, 0.2264, 0.2199, 0.1311, 0.0906, 0.1820])
    assert_shows(output_of(cells, "context_vec_2 = attn_weights_2 @ values"), [0.3061, 0.8210])
    assert_shows(output_of(cells, "sa_v1 = SelfAttention_v1(d_in, d_out)"),
                 flat([[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203], [0.2948, 0.7939], [0.2927, 0.7891],
                       [0.2990, 0.8040]]))
    assert_shows(output_of(cells, "sa_v2 = SelfAttention_v2(d_in, d_out)"),
                 flat([[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702], [-0.0760, 0.0685],
                       [-0.0763, 0.0679], [-0.0754, 0.0693]]))


def test_ch03_causal_and_multi_head_attention_print_the_books_numbers():
    cells = load("ch03/ch03.ipynb")
    causal = flat([[1.0, 0, 0, 0, 0, 0], [0.5517, 0.4483, 0, 0, 0, 0], [0.3800, 0.3097, 0.3103, 0, 0, 0],
                   [0.2758, 0.2460, 0.2462, 0.2319, 0, 0], [0.2175, 0.1983, 0.1984, 0.1888, 0.1971, 0],
                   [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529]])
    assert_shows(output_of(cells, "masked_simple_norm = masked_simple / row_sums"), causal)
    assert_shows(output_of(cells, "attn_weights = torch.softmax(masked / keys.shape[-1]**0.5, dim=-1)"), causal)
    ca = [[-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632], [-0.5675, -0.0843], [-0.5526, -0.0981],
          [-0.5299, -0.1081]]
    assert_shows(output_of(cells, "ca = CausalAttention(d_in, d_out, context_length, 0.0)"), flat(ca) + flat(ca))
    wrapper = [[-0.4519, 0.2216, 0.4772, 0.1063], [-0.5874, 0.0058, 0.5891, 0.3257],
               [-0.6300, -0.0632, 0.6202, 0.3860], [-0.5675, -0.0843, 0.5478, 0.3589],
               [-0.5526, -0.0981, 0.5321, 0.3428], [-0.5299, -0.1081, 0.5077, 0.3493]]
    assert_shows(output_of(cells, "mha = MultiHeadAttentionWrapper(d_in, d_out, context_length, 0.0, num_heads=2)"),
                 flat(wrapper) + flat(wrapper) + [2, 6, 4])
    mha = [[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593], [0.2693, 0.3873], [0.2639, 0.3928],
           [0.2575, 0.4028]]
    # The book's listing, then ours (SDPA + KV cache) with the same seed: the same numbers.
    assert_shows(output_of(cells, "book_context_vecs = context_vecs"), flat(mha) + flat(mha) + [2, 6, 2])
    assert_shows(output_of(cells, "assert torch.allclose(context_vecs, book_context_vecs, atol=1e-6)"),
                 flat(mha) + flat(mha) + [2, 6, 2])
    assert_shows(output_of(cells, "print(a @ a.transpose(2, 3))"), [1.3208, 1.1631, 1.2879, 1.1631, 2.2150, 1.8424])
    assert "2,360,064" in output_of(cells, "gpt2_attention = MultiHeadAttention(768, 768")


def test_ch03_exercises_print_the_books_numbers():
    cells = load("ch03/exercise-solutions.ipynb")
    v1 = [[-0.5337, -0.1051], [-0.5323, -0.1080], [-0.5323, -0.1079], [-0.5297, -0.1076], [-0.5311, -0.1066],
          [-0.5299, -0.1081]]
    assert_shows(output_of(cells, "sa_v1.W_query = torch.nn.Parameter(sa_v2.W_query.weight.T)"), flat(v1) + flat(v1))
    assert_shows(output_of(cells, "mha = MultiHeadAttentionWrapper(d_in, d_out=1"),
                 flat([[-0.5740, 0.2216], [-0.7320, 0.0155], [-0.7774, -0.0546], [-0.6979, -0.0817],
                       [-0.6538, -0.0957], [-0.6424, -0.1065]]))
    assert "2,360,064" in output_of(cells, "num_params = sum(p.numel() for p in mha.parameters())")


# --- appendix A --------------------------------------------------------------------------------------

BOOK_LOSSES = [1, 3, 1, 2, 0.75, 1, 3, 2, 2, 0.65, 2, 3, 1, 2, 0.44, 2, 3, 2, 2, 0.13, 3, 3, 1, 2, 0.03,
               3, 3, 2, 2, 0.00]  # "Epoch: 001/003 | Batch 001/002 | Train/Val Loss: 0.75", ...


def test_appendix_a_autograd_and_network_print_the_books_numbers():
    cells = load("appendix-A/code-part1.ipynb")
    assert_shows(output_of(cells, "loss = F.binary_cross_entropy(a, y)\nprint(loss)"), [0.0852])
    assert_shows(output_of(cells, "grad_L_w1 = grad(loss, w1, retain_graph=True)"), [-0.0898, -0.0817])
    assert_shows(output_of(cells, "loss.backward()\n\nprint(w1.grad)"), [-0.0898, -0.0817])
    assert_shows(output_of(cells, 'print("Total number of trainable model parameters:", num_params)'), [2213])
    assert_shows(output_of(cells, "print(model.layers[0].weight)"), [-0.0577, 0.0047, -0.0702])
    assert_shows(output_of(cells, "X = torch.rand((1, 50))"), [-0.1262, 0.1080, -0.1792])
    assert_shows(output_of(cells, "out = torch.softmax(model(X), dim=1)"), [0.3113, 0.3934, 0.2952])


def test_appendix_a_training_prints_the_books_numbers():
    cells = load("appendix-A/code-part1.ipynb")
    # The book's shuffled batches, first without and then with drop_last=True.
    batches = [c for c in cells if "for idx, (x, y) in enumerate(train_loader):" in "".join(c["source"])]
    assert len(batches) == 2
    text = ["".join(o.get("text", "")) for c in batches for o in c["outputs"]]
    assert_shows(text[0], [1, 2.3, -1.1, -0.9, 2.9, 1, 0, 2, -1.2, 3.1, -0.5, 2.6, 0, 0, 3, 2.7, -1.5, 1])
    assert_shows(text[1], [1, -1.2, 3.1, -0.5, 2.6, 0, 0, 2, 2.3, -1.1, -0.9, 2.9, 1, 0])
    assert_shows(output_of(cells, "optimizer = torch.optim.SGD(model.parameters(), lr=0.5)"), BOOK_LOSSES, tol=0.005)
    assert_shows(output_of(cells, "outputs = model(X_train)"),
                 flat([[2.8569, -4.1618], [2.5382, -3.7548], [2.0944, -3.1820], [-1.4814, 1.4816],
                       [-1.7176, 1.7342]]))
    assert_shows(output_of(cells, "probas = torch.softmax(outputs, dim=1)"),
                 flat([[0.9991, 0.0009], [0.9982, 0.0018], [0.9949, 0.0051], [0.0491, 0.9509], [0.0307, 0.9693]])
                 + [0, 0, 0, 1, 1])
    assert_shows(output_of(cells, "print(compute_accuracy(model, train_loader))"), [1.0, 1.0])
    # Our `train` function takes the same steps as the book's loop.
    assert_shows(output_of(cells, "losses = train(model_2, train_loader"), BOOK_LOSSES, tol=0.005)
    assert_shows(output_of(load("appendix-A/code-part2.ipynb"), "losses = toy.train(model, train_loader"),
                 BOOK_LOSSES + [1.0, 1.0], tol=0.005)


def test_appendix_a_exercise_parameter_count():
    assert_shows(output_of(load("appendix-A/exercise-solutions.ipynb"), "def mlp_param_count"), [752, 752])
