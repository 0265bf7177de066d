"""How S is chosen: the MI estimator, the scheduler that refreshes S, and branch equivalence."""
