"""The GSLB wire contract: pydantic schemas (`contract.schemas`) and the typed httpx client
(`contract.client`), shared by the API, the edge agent and edgectl, and the JSON log line
format both processes write (`contract.logs`)."""
