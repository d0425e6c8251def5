"""The HTTP layer: who is asking (access), reading and answering (base), errors to statuses
(statuses), Server-Sent Events (events), the endpoints (handlers) and the route table (routes)."""
