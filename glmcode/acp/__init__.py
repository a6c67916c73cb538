"""ACP: glmcode as an Agent Client Protocol agent (`glmcode acp`), through the official library.

agent    the protocol's agent side mapped onto glmcode sessions, approvals and cancellation
updates  tool kinds, titles, diffs and prompt text as the client sees them
"""
