"""certmq device library: keys, CSRs, provisioning, certificate store, renewal agent."""
