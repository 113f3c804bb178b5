"""The edge's `/v1` management API: its Klein app, operations, models and OpenAPI document."""
