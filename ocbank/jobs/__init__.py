"""Jobs over datasets: batch builds (local or Ray), evaluation, prediction and reports."""
