"""What a run tells its user: results.json, the summary and JUnit (report), timelines and
Chrome traces (render), attribution, causes and run directories (explain), the soak's
live panel (progress)."""
