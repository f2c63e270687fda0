"""Bad prompt files are refused with the file, the row and what was expected (issue 13)."""
import pytest

from dd.pipeline.prompt_files import PromptFileError, byte_tokens, read_prompts


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def test_a_good_file_reads_in_order_with_its_extra_columns(tmp_path):
    p = write(tmp_path, "p.tsv", "prompt\tdigit\na bold seven leaning right\t7\n\"quoted\" thin 3\t3\n")
    rows = read_prompts(p, "prompt", ("digit",))
    assert rows == [{"prompt": "a bold seven leaning right", "digit": "7"}, {"prompt": '"quoted" thin 3', "digit": "3"}]
    csv_file = write(tmp_path, "p.csv", 'caption,id\n"a dog, running",1\n')
    assert read_prompts(csv_file, "caption") == [{"caption": "a dog, running"}]


@pytest.mark.parametrize("name,data,words", [
    ("missing.csv", "text\nhello\n", ["no column 'caption'", "'text'"]),
    ("empty.csv", "caption\nfine\n   \n", ["row 3", "empty prompt"]),
    ("long.csv", "caption\nshort\n" + "x" * 120 + "\n", ["row 3", "121 tokens", "120"]),
    ("latin1.csv", "caption\nok\ncaf\xe9\n".encode("latin-1"), ["row 3", "not UTF-8", "0xe9"]),
    ("header_only.csv", "caption\n", ["no prompts"]),
])
def test_bad_files_name_the_file_and_the_row(tmp_path, name, data, words):
    p = write(tmp_path, name, data)
    with pytest.raises(PromptFileError) as e:
        read_prompts(p, "caption")
    message = str(e.value)
    assert str(p) in message
    for w in words:
        assert w in message, message


def test_token_count_is_the_encoders_and_can_be_replaced(tmp_path):
    assert byte_tokens("abc") == 4 and byte_tokens("é") == 3          # UTF-8 bytes + end of sequence
    p = write(tmp_path, "p.csv", "caption\none two three four\n")
    with pytest.raises(PromptFileError, match="4 tokens, longer than the 3"):
        read_prompts(p, "caption", count_tokens=lambda s: len(s.split()), max_tokens=3)
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(tmp_path / "none.csv", "caption")
