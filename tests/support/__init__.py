"""Helpers the tests share: constants, policy builders, store targets, the in-process app,
served proxies and private servers, the ImageRouter stand-in, a webhook receiver, a browser."""
