"""What people read: status/report.html, the live view `status --watch`, the model card."""
