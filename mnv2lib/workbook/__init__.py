"""The workbook: the notebook catalogue, the run plan of every notebook, the report runner, the command
line, the notebooks' session object and widgets."""
