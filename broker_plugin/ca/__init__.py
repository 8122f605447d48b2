"""Certificate authority: policy, profiles, issuance, signers, CRLs."""
