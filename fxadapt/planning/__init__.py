"""Planning: budgets, the data-free width solver and width/depth plans."""
