"""What people read: the pictures and styles every page shares, recall tables as text, the run's
page, and TensorBoard event files. Nothing here starts Ray or trains."""
