"""The course around the notebooks: exercise checks and the student/instructor builds.

Convention (one for every notebook):

- an exercise is a markdown cell (tagged ``exercise``) with the task, a code cell where the
  student works, and a check cell calling ``helpers.course.nbNN.<check>(...)``, which returns
  a :class:`helpers.course.feedback.Feedback` ("right" or "not yet, and why");
- the worked solution is a code cell tagged ``solution``, placed before the check; the
  student build strips it, the instructor build keeps it, and both are run by the tests;
- ``helpers/course/nbNN.py`` holds the checks of notebook ``NN``.
"""
