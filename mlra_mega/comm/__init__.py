"""What a step communicates: the ledger of every collective and point-to-point call as it happens
(`comm.ledger`), and what a layout must move by its shape (`comm.expected`)."""
