"""The edge's control listener and its `/v1` management API: the listener (`/health`,
`/metrics`), the Klein app, the operations, models and OpenAPI document, the queue API."""
