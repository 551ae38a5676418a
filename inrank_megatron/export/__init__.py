"""Checkpoint tools: read a training checkpoint, export it (Hugging Face GPT-2, InRank-native),
import a Hugging Face GPT-2 as a training checkpoint."""
