"""The data plane: code that runs inside Ray worker actors. Heavy ML libraries are imported only here."""
