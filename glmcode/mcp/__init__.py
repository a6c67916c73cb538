"""MCP: tools from Model Context Protocol servers, through the official `mcp` SDK.

config   the `[mcp_servers.NAME]` tables (plain data; no SDK import)
client   McpServers: start the servers in parallel, call their tools, stop them (no orphans)
results  a tool result as text for the model
tools    MCP tools as glmcode tools named mcp__SERVER__TOOL
"""
