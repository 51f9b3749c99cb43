"""Attention rules: scaled dot-product attention, GQA/MQA head repeat, the KV-cache concat."""
