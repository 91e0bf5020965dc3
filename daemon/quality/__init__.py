"""The evaluation rows read as answers: the forgetting matrix, backward and forward transfer, the quality gate."""
