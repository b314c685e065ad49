"""Offline data sets, their federated split and tokenisation."""
