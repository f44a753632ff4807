"""Offline model zoos (CLIP and LLM) for the backdoor lab."""
