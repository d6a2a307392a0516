"""Read a sweep's stored results (MLflow) and turn them into scaling fits, plots, a report and Parquet.

loader.load_sweep -> SweepResults; scaling.fit_power_law / bootstrap_exponent / fit_sweep;
plots.plot_*; report.build_report / publish_report; export.export_parquet. Nothing here trains.
"""
