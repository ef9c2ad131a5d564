"""Nexus: the LLM router (task type x complexity -> ordered models with fallbacks) and its offline stand-in.

The submodules are imported explicitly: `routing_config` and `complexity` are cheap and pure, while
`offline_model` and `router` import litellm, which takes seconds.
"""
