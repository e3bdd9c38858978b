"""Control plane: building and hosting inferlets, and (later) serving them on Ray."""
