from __future__ import annotations

from dubhe.keys.format import KEY_LENGTH, display_prefix, generate_key, hash_key, is_well_formed


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("sk-dubhe-") and len(key) == KEY_LENGTH
        assert is_well_formed(key)


def test_a_changed_character_breaks_the_checksum() -> None:
    key = generate_key()
    for position in range(len("sk-dubhe-"), len(key)):
        replacement = "a" if key[position] != "a" else "b"
        assert not is_well_formed(key[:position] + replacement + key[position + 1 :])


def test_hash_depends_on_the_secret_and_prefix_hides_the_key() -> None:
    key = generate_key()
    assert hash_key(b"one", key) != hash_key(b"two", key)
    assert len(hash_key(b"one", key)) == 64
    assert display_prefix(key).endswith("…") and len(display_prefix(key)) < 16
